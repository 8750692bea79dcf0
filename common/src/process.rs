//! What every service binary does before it starts: answer `--help` and `--version`
//! (and refuse arguments it does not know) without touching a server. Configuration
//! comes only from the environment; the help lists every variable ([`crate::config::VARS`])
//! with its default and meaning.

use crate::config::VARS;

/// The part of every service's `--help` after its own description: every variable, its
/// default and what it means.
pub fn environment_help() -> String {
    let mut out = String::from(
        "Configuration comes from FLOODGATE_* environment variables; there are no flags.\n\
         FLOODGATE_JWT_SECRET is required (`ops/stack up` keeps one in .stack/jwt-secret).\n\
         A set FLOODGATE_* variable that is not listed here is ignored with a warning.\n\
         Limits and details: README.md, section Configuration.\n\nEnvironment:\n",
    );
    for v in VARS {
        let default = if v.default.is_empty() {
            "(no default)".to_owned()
        } else {
            format!("[default: {}]", v.default)
        };
        out.push_str(&format!("  {} {default}\n          {}\n", v.name, v.about));
    }
    out.push_str("\nSignals: SIGTERM or SIGINT stops gracefully.");
    out
}

/// Parses the command line of service `name`: prints help or the version and exits for
/// `--help`/`--version`, exits 2 with usage on anything else; returns when there are no
/// arguments.
pub fn service_args(name: &'static str, about: &'static str) {
    clap::Command::new(name)
        .bin_name(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .after_help(environment_help())
        .get_matches();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_help_lists_every_variable_with_its_default() {
        let help = super::environment_help();
        for v in crate::config::VARS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} ", v.name)))
                .unwrap_or_else(|| panic!("{} missing: {help}", v.name));
            if !v.default.is_empty() {
                assert!(
                    line.ends_with(&format!("[default: {}]", v.default)),
                    "{line}"
                );
            }
            assert!(help.contains(v.about), "{}", v.name);
        }
    }
}

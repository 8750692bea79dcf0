//! Webhooks' shared pieces: the event types a subscription may name, the Standard
//! Webhooks signature, the secrets, and the address policy that keeps a webhook from
//! reaching into the network floodgate runs in (SSRF).
//!
//! The signature follows <https://www.standardwebhooks.com>: `webhook-id` (the event id,
//! the same on every attempt and replay, which receivers de-duplicate by),
//! `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature`
//! (`v1,<standard base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`), where the
//! key is the secret `whsec_<base64 key>` decoded.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The event types a subscription may name: each is the routing key of the committed
/// event (an outbox row) it delivers.
pub const EVENT_TYPES: &[&str] = &[
    "order.confirmed",
    "order.failed",
    "order.cancelled",
    "stock.sold_out",
];

/// Taken (exclusive, for one transaction) by a worker's retention batch that deletes
/// deliveries and the events they were the last to name, and shared by a replay: a
/// replay never re-arms an event a prune is deleting under it (the foreign key would
/// refuse the replay), and a prune never deletes a delivery a replay has just re-armed.
pub const PRUNE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('floodgate.webhook-prune'), hashtext(current_schema()))";
/// The replay's side of [`PRUNE_LOCK`].
pub const PRUNE_LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared(hashtext('floodgate.webhook-prune'), hashtext(current_schema()))";

/// The secret's prefix, as the specification writes it.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The key a secret stands for; None if it is not `whsec_<base64>`.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX)?)
        .ok()
        .filter(|k| !k.is_empty())
}

/// The `webhook-signature` header's value for one attempt.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether a webhook may reach `ip`: not loopback, private, link-local, shared (CGNAT),
/// unspecified, multicast, broadcast, documentation or reserved space, in IPv4 or
/// IPv6 (an IPv4-mapped or NAT64 address is judged by the IPv4 address inside).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public_v4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96, the NAT64 well-known prefix: the IPv4 address in its tail.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return public_v4(Ipv4Addr::new(a, b, c, d));
            }
            // 2002::/16, 6to4: the IPv4 address in bits 16-47.
            if s[0] == 0x2002 {
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                // 2001::/32, Teredo: tunnels to an (obfuscated) IPv4 address
                || (s[0] == 0x2001 && s[1] == 0)
                // fec0::/10, the deprecated site-local addresses
                || (s[0] & 0xffc0) == 0xfec0
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                // 2001:db8::/32, documentation
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                // ::/96, the deprecated IPv4-compatible addresses
                || s[..6] == [0; 6]
                || v6 == Ipv6Addr::LOCALHOST)
        }
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        // 100.64.0.0/10, shared address space (carrier-grade NAT)
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24, IETF protocol assignments
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        // 192.88.99.0/24, the deprecated 6to4 relay anycast
        || (a == 192 && b == 88 && ip.octets()[2] == 99)
        // 198.18.0.0/15, benchmarking
        || (a == 198 && (b == 18 || b == 19))
        // 240.0.0.0/4, reserved
        || a >= 240)
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("url: {0}")]
    Malformed(String),
    #[error("url: the host {host} did not resolve ({reason})")]
    Unresolved { host: String, reason: String },
    #[error(
        "url: {host} resolves to {addr}, a loopback, private or reserved address; webhooks reach only public addresses unless FLOODGATE_WEBHOOK_ALLOW_PRIVATE=true"
    )]
    Private { host: String, addr: IpAddr },
}

/// At most this long for the DNS answer when a webhook is created.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Checks a webhook URL as it is created: http or https, a host, no user info or
/// fragment, at most 2048 bytes, and (unless `allow_private`) every address its host
/// resolves to public. The worker checks again on every connection
/// (`PublicOnly`-style resolver), since a name can resolve elsewhere later.
pub async fn check_url(raw: &str, allow_private: bool) -> Result<url::Url, UrlRefused> {
    let bad = |m: &str| Err(UrlRefused::Malformed(m.to_owned()));
    if raw.len() > 2048 {
        return bad("at most 2048 bytes");
    }
    let url = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(e) => return Err(UrlRefused::Malformed(format!("not a URL ({e})"))),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return bad("must be http or https");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return bad("must not carry a user name or password");
    }
    if url.fragment().is_some() {
        return bad("must not have a fragment");
    }
    let Some(host) = url.host() else {
        return bad("must name a host");
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<IpAddr> = match host {
        url::Host::Ipv4(ip) => vec![IpAddr::V4(ip)],
        url::Host::Ipv6(ip) => vec![IpAddr::V6(ip)],
        url::Host::Domain(name) => {
            if allow_private {
                // Resolution is the only reason to look it up; a private platform may
                // not resolve from here yet.
                return Ok(url);
            }
            let looked = tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((name.to_owned(), port)),
            )
            .await;
            let unresolved = |reason: String| UrlRefused::Unresolved {
                host: name.to_owned(),
                reason,
            };
            match looked {
                Err(_) => return Err(unresolved(format!("no answer in {RESOLVE_TIMEOUT:?}"))),
                Ok(Err(e)) => return Err(unresolved(e.to_string())),
                Ok(Ok(addrs)) => addrs.map(|a: SocketAddr| a.ip()).collect(),
            }
        }
    };
    if !allow_private {
        if let Some(addr) = addrs.iter().copied().find(|a| !is_public(*a)) {
            return Err(UrlRefused::Private {
                host: url.host_str().unwrap_or_default().to_owned(),
                addr,
            });
        }
        if addrs.is_empty() {
            return Err(UrlRefused::Unresolved {
                host: url.host_str().unwrap_or_default().to_owned(),
                reason: "no address".into(),
            });
        }
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_specifications_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_new_secret_is_a_key() {
        let s = new_secret();
        assert!(s.starts_with(SECRET_PREFIX));
        assert_eq!(secret_key(&s).unwrap().len(), 32);
        assert_ne!(s, new_secret());
        assert_eq!(secret_key("whsec_"), None);
        assert_eq!(secret_key("nope"), None);
    }

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "ff02::1",
            "fec0::1",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001:0:4136:e378::1",
            "192.88.99.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "2002:101:101::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked() {
        let refused = |u: &'static str| async move { check_url(u, false).await.unwrap_err() };
        assert!(matches!(
            refused("ftp://example.com/").await,
            UrlRefused::Malformed(_)
        ));
        assert!(matches!(
            refused("not a url").await,
            UrlRefused::Malformed(_)
        ));
        assert!(matches!(
            refused("http://u:p@1.1.1.1/").await,
            UrlRefused::Malformed(_)
        ));
        assert!(matches!(
            refused("http://127.0.0.1:9/x").await,
            UrlRefused::Private { .. }
        ));
        assert!(matches!(
            refused("http://[::1]/").await,
            UrlRefused::Private { .. }
        ));
        assert!(matches!(
            refused("http://localhost/").await,
            UrlRefused::Private { .. }
        ));
        assert!(matches!(
            refused("http://169.254.169.254/latest").await,
            UrlRefused::Private { .. }
        ));
        // Decimal and hex spellings of loopback are parsed as the address they are.
        assert!(matches!(
            refused("http://2130706433/").await,
            UrlRefused::Private { .. }
        ));
        assert!(matches!(
            refused("http://0x7f.1/").await,
            UrlRefused::Private { .. }
        ));
        assert!(check_url("https://1.1.1.1/hook", false).await.is_ok());
        assert!(check_url("http://127.0.0.1:9/x", true).await.is_ok());
    }
}

//! Property tests of the domain parsers (`common/src/domain.rs`): each newtype accepts
//! exactly what API.md allows, refuses everything else with the error that names the rule
//! it breaks, round-trips what it accepts (`parse`, `Display`, `String::from`, serde), and
//! never panics, whatever the input: any Unicode, NUL and other control characters, bytes
//! that are not UTF-8, JSON of any shape.
//!
//! Each parser is checked against a model written from the contract (API.md's limits), not
//! from the code. Inputs come from two kinds of strategy: arbitrary strings (mostly
//! invalid), and strings built near the boundary (right alphabet, lengths around the
//! limit, one foreign character spliced in), where the interesting cases live.

use floodgate_common::{
    Namespace,
    domain::{
        IdempotencyKey, Invalid, OrderId, OrderLine, OrderLines, OrderStatus, Quantity, Reference,
        Sku, UserId,
    },
    redis::Keys,
};
use proptest::prelude::*;
use proptest::sample::select;
use uuid::Uuid;

const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

/// Characters that break some rule somewhere: NUL and other C0/C1 controls, DEL, the
/// separators the Redis keys use, whitespace, non-ASCII of 2, 3 and 4 bytes in UTF-8.
const FOREIGN: &[char] = &[
    '\0',
    '\u{1}',
    '\t',
    '\n',
    '\r',
    '\u{1b}',
    '\u{7f}',
    '\u{80}',
    '\u{9f}',
    ' ',
    ':',
    '{',
    '}',
    '*',
    '/',
    '"',
    '\\',
    '%',
    'é',
    'ß',
    '\u{a0}',
    '\u{200b}',
    '\u{2028}',
    '€',
    '中',
    '\u{feff}',
    '😀',
    '\u{10ffff}',
];

/// A string of `alphabet` characters of length `len`, with up to two `FOREIGN`
/// characters spliced in at random places.
fn near(alphabet: &'static str, len: std::ops::RangeInclusive<usize>) -> BoxedStrategy<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    (
        prop::collection::vec(select(chars), len),
        prop::collection::vec((any::<prop::sample::Index>(), select(FOREIGN)), 0..=2),
    )
        .prop_map(|(mut s, splices)| {
            for (at, c) in splices {
                let i = at.index(s.len() + 1);
                s.insert(i, c);
            }
            s.into_iter().collect()
        })
        .boxed()
}

/// Any string: the arbitrary Unicode of proptest, or one near the boundary.
fn any_string(alphabet: &'static str, max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        2 => any::<String>(),
        1 => ".{0,300}",
        4 => near(alphabet, 0..=max + 3),
    ]
    .boxed()
}

const SKU_ALPHABET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
const PRINTABLE: &str = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
const USER_ALPHABET: &str = "ab:c-d_e.9 Zé中😀";

/// Which rule a string-newtype's model says the input breaks.
#[derive(Debug, PartialEq, Eq)]
enum Broken {
    None,
    Length,
    Charset,
    /// Both the character rule and, counted in bytes, the length rule: non-ASCII input
    /// within the limit in characters but past it in bytes. The parsers count bytes (they
    /// may: the accepted alphabets are ASCII), so either message names a broken rule.
    CharsetOrLength,
}

/// The model of a string newtype: `1..=max` characters of `allowed`.
fn model(s: &str, max: usize, allowed: impl Fn(char) -> bool) -> Broken {
    let chars = s.chars().count();
    if chars == 0 || chars > max {
        Broken::Length
    } else if s.chars().all(allowed) {
        Broken::None
    } else if s.len() > max {
        Broken::CharsetOrLength
    } else {
        Broken::Charset
    }
}

/// Checks one string newtype against its model: accepted exactly when the model accepts,
/// the error names the broken rule, and an accepted value round-trips every way.
fn check_string_newtype<T>(
    s: &str,
    expected: Broken,
    parse: impl Fn(String) -> Result<T, Invalid>,
    as_str: impl Fn(&T) -> &str,
    length_msg: &str,
    charset_msg: &str,
) -> Result<(), TestCaseError>
where
    T: std::fmt::Display
        + std::fmt::Debug
        + PartialEq
        + Clone
        + Into<String>
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let parsed = parse(s.to_owned());
    // Deserializing checks the same rules as parse: an invalid value cannot be built.
    let json = serde_json::to_string(s).expect("a string serializes");
    let deserialized = serde_json::from_str::<T>(&json);
    prop_assert_eq!(
        parsed.is_ok(),
        deserialized.is_ok(),
        "parse and serde disagree"
    );
    match (expected, parsed) {
        (Broken::None, Ok(v)) => {
            prop_assert_eq!(as_str(&v), s);
            prop_assert_eq!(v.to_string(), s);
            prop_assert_eq!(serde_json::to_string(&v).unwrap(), json);
            prop_assert_eq!(&deserialized.unwrap(), &v);
            let reparsed = parse(v.to_string());
            prop_assert_eq!(reparsed.as_ref(), Ok(&v));
            let owned: String = v.into();
            prop_assert_eq!(owned, s);
        }
        (Broken::None, Err(e)) => prop_assert!(false, "{s:?} refused: {e}"),
        (broken, Ok(v)) => prop_assert!(false, "{s:?} ({broken:?}) accepted as {v:?}"),
        (Broken::Length, Err(e)) => prop_assert_eq!(e.0, length_msg),
        (Broken::Charset, Err(e)) => prop_assert_eq!(e.0, charset_msg),
        (Broken::CharsetOrLength, Err(e)) => {
            prop_assert!(e.0 == length_msg || e.0 == charset_msg, "{s:?}: {e}")
        }
    }
    Ok(())
}

fn sku_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn printable_ascii(c: char) -> bool {
    (' '..='~').contains(&c)
}

proptest! {
    #![proptest_config(config())]

    /// API.md: SKU ids are 1-64 chars of `[A-Za-z0-9._-]`.
    #[test]
    fn sku_accepts_exactly_the_contract(s in any_string(SKU_ALPHABET, 64)) {
        check_string_newtype(
            &s,
            model(&s, 64, sku_char),
            Sku::parse,
            Sku::as_str,
            "a SKU id is 1-64 characters",
            "a SKU id may contain only A-Z, a-z, 0-9, '.', '_' and '-'",
        )?;
    }

    /// API.md: `sub` is a user id of 1-64 chars; control characters (NUL, newlines, C1)
    /// are refused, any other Unicode is fine.
    #[test]
    fn user_id_accepts_exactly_the_contract(s in any_string(USER_ALPHABET, 64)) {
        let expected = match model(&s, 64, |c| !c.is_control()) {
            // Counted in characters: no byte-length ambiguity.
            Broken::CharsetOrLength => Broken::Charset,
            b => b,
        };
        check_string_newtype(
            &s,
            expected,
            UserId::parse,
            UserId::as_str,
            "a user id is 1-64 characters",
            "a user id may not contain control characters",
        )?;
    }

    /// API.md: `Idempotency-Key` is 1-128 printable ASCII.
    #[test]
    fn idempotency_key_accepts_exactly_the_contract(s in any_string(PRINTABLE, 128)) {
        check_string_newtype(
            &s,
            model(&s, 128, printable_ascii),
            IdempotencyKey::parse,
            IdempotencyKey::as_str,
            "Idempotency-Key is 1-128 characters",
            "Idempotency-Key may contain only printable ASCII",
        )?;
    }

    /// A goods-received reference: 1-128 printable ASCII.
    #[test]
    fn reference_accepts_exactly_the_contract(s in any_string(PRINTABLE, 128)) {
        check_string_newtype(
            &s,
            model(&s, 128, printable_ascii),
            Reference::parse,
            Reference::as_str,
            "reference is 1-128 characters",
            "reference may contain only printable ASCII",
        )?;
    }

    /// API.md: quantities are integers 1..=1000 per line.
    #[test]
    fn quantity_accepts_exactly_1_to_1000(
        v in prop_oneof![any::<i64>(), -5i64..1010, Just(i64::MIN), Just(i64::MAX)],
    ) {
        match Quantity::try_from(v) {
            Ok(q) => {
                prop_assert!((1..=1000).contains(&v));
                prop_assert_eq!(q.get(), v);
                prop_assert_eq!(i64::from(q), v);
                prop_assert_eq!(serde_json::to_string(&q).unwrap(), v.to_string());
                prop_assert_eq!(serde_json::from_str::<Quantity>(&v.to_string()).unwrap(), q);
            }
            Err(e) => {
                prop_assert!(!(1..=1000).contains(&v));
                prop_assert_eq!(e.0, format!("qty must be 1..=1000, got {v}"));
                prop_assert!(serde_json::from_str::<Quantity>(&v.to_string()).is_err());
            }
        }
    }

    /// A quantity in JSON is an integer: no fractions, strings, exponents past the range
    /// or booleans sneak in through serde.
    #[test]
    fn quantity_from_any_json_number_or_token(
        token in prop_oneof![
            any::<f64>().prop_map(|f| f.to_string()),
            (1i64..=1000).prop_map(|v| format!("{v}.5")),
            (1i64..=1000).prop_map(|v| format!("\"{v}\"")),
            Just("1e3".to_owned()),
            Just("true".to_owned()),
            Just("null".to_owned()),
            "[0-9eE.+-]{1,30}",
        ],
    ) {
        let parsed = serde_json::from_str::<Quantity>(&token);
        // The model: a JSON integer (no '+', no leading zero, no fraction) in 1..=1000.
        let as_int = serde_json::from_str::<serde_json::Value>(&token)
            .ok()
            .and_then(|v| v.as_i64())
            .filter(|v| (1..=1000).contains(v));
        prop_assert_eq!(parsed.ok().map(Quantity::get), as_int, "{}", token);
    }

    /// Every UUID round-trips through its canonical text; whatever `parse` accepts,
    /// printing and parsing again gives the same id.
    #[test]
    fn order_id_round_trips(bits in any::<u128>(), s in any_string("0123456789abcdefABCDEF-{}urn:id", 45)) {
        let id = OrderId::from(Uuid::from_u128(bits));
        prop_assert_eq!(OrderId::parse(&id.to_string()), Some(id));
        prop_assert_eq!(id.as_uuid().as_u128(), bits);
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(serde_json::from_str::<OrderId>(&json).unwrap(), id);
        if let Some(parsed) = OrderId::parse(&s) {
            prop_assert_eq!(OrderId::parse(&parsed.to_string()), Some(parsed));
            prop_assert_eq!(parsed.to_string().len(), 36);
        }
    }

    /// OrderStatus reads back exactly the four words it writes, nothing else.
    #[test]
    fn order_status_parses_only_its_words(s in any_string("acceptdonfirmlu", 12)) {
        let words = ["accepted", "confirmed", "failed", "cancelled"];
        match OrderStatus::parse(&s) {
            Some(st) => prop_assert_eq!(st.as_str(), s.as_str()),
            None => prop_assert!(!words.contains(&s.as_str())),
        }
    }

    /// No parser panics on any bytes, as text (lossy) or as JSON of any newtype.
    #[test]
    fn no_parser_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let s = String::from_utf8_lossy(&bytes).into_owned();
        let _ = Sku::parse(s.clone());
        let _ = UserId::parse(s.clone());
        let _ = IdempotencyKey::parse(s.clone());
        let _ = Reference::parse(s.clone());
        let _ = OrderId::parse(&s);
        let _ = OrderStatus::parse(&s);
        let _ = Namespace::parse(&s);
        let _ = serde_json::from_slice::<Sku>(&bytes);
        let _ = serde_json::from_slice::<UserId>(&bytes);
        let _ = serde_json::from_slice::<Quantity>(&bytes);
        let _ = serde_json::from_slice::<OrderId>(&bytes);
        let _ = serde_json::from_slice::<OrderLine>(&bytes);
        let _ = serde_json::from_slice::<OrderLines>(&bytes);
    }
}

/// One line as a client may send it: any SKU text, any qty.
#[derive(Debug, Clone)]
struct RawLine {
    sku: String,
    qty: i64,
}

fn raw_line() -> impl Strategy<Value = RawLine> {
    // A small pool of valid SKUs makes duplicates common; sometimes an invalid one.
    let sku = prop_oneof![
        8 => select(vec!["a", "b", "c", "tee-red-m", "A.b_C-9", "x"])
            .prop_map(str::to_owned),
        4 => "[a-z0-9]{1,3}",
        1 => any_string(SKU_ALPHABET, 64),
    ];
    let qty = prop_oneof![8 => 1i64..=1000, 1 => any::<i64>(), 1 => -2i64..=2];
    (sku, qty).prop_map(|(sku, qty)| RawLine { sku, qty })
}

/// What the contract says of an order body's lines, line rules first (the first bad
/// line), then the order rules (1-50 lines, no SKU twice).
fn lines_model(lines: &[RawLine]) -> Result<(), String> {
    for l in lines {
        if model(&l.sku, 64, sku_char) != Broken::None || !(1..=1000).contains(&l.qty) {
            return Err("line".into());
        }
    }
    if lines.is_empty() {
        return Err("items: an order needs at least one line".into());
    }
    if lines.len() > 50 {
        return Err(format!(
            "items: at most 50 lines per order, got {}",
            lines.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for l in lines {
        if !seen.insert(l.sku.as_str()) {
            return Err(format!(
                "items: SKU {} appears twice; put the quantity on one line",
                l.sku
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// An order body's lines: accepted exactly when every line is valid, there are 1-50
    /// of them and no SKU appears twice; the error names the first broken order rule;
    /// an accepted order round-trips through JSON with its lines in order.
    #[test]
    fn order_lines_accept_exactly_the_contract(
        lines in prop_oneof![
            4 => prop::collection::vec(raw_line(), 0..=8),
            1 => prop::collection::vec(raw_line(), 45..=56),
            1 => (45usize..=56).prop_map(|n| (0..n)
                .map(|i| RawLine { sku: format!("s{i}"), qty: 1 })
                .collect()),
        ],
    ) {
        let expected = lines_model(&lines);
        let json = serde_json::to_string(
            &lines
                .iter()
                .map(|l| serde_json::json!({"sku": l.sku, "qty": l.qty}))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let from_json = serde_json::from_str::<OrderLines>(&json);
        prop_assert_eq!(from_json.is_ok(), expected.is_ok(), "{} -> {:?}", json, from_json);

        // Through the typed path: parse each line, then the order rules.
        let typed: Result<Vec<OrderLine>, Invalid> = lines
            .iter()
            .map(|l| {
                Ok(OrderLine {
                    sku: Sku::parse(l.sku.clone())?,
                    qty: Quantity::try_from(l.qty)?,
                })
            })
            .collect();
        match (typed, &expected) {
            (Err(_), Err(e)) => prop_assert_eq!(e.as_str(), "line"),
            (Err(e), Ok(())) => prop_assert!(false, "a valid line refused: {e}"),
            (Ok(typed), expected) => {
                let order = OrderLines::try_from(typed.clone());
                match (order, expected) {
                    (Ok(order), Ok(())) => {
                        prop_assert_eq!(order.as_slice(), typed.as_slice());
                        let back: Vec<OrderLine> = order.clone().into();
                        prop_assert_eq!(&back, &typed);
                        let again = serde_json::to_string(&order).unwrap();
                        prop_assert_eq!(
                            serde_json::from_str::<serde_json::Value>(&again).unwrap(),
                            serde_json::from_str::<serde_json::Value>(&json).unwrap()
                        );
                        prop_assert_eq!(serde_json::from_str::<OrderLines>(&again).unwrap(), order);
                    }
                    (Err(e), Err(want)) => prop_assert_eq!(&e.0, want),
                    (got, want) => prop_assert!(false, "{got:?}, model {want:?}"),
                }
            }
        }
    }

    /// Bodies of any JSON shape never panic, and whatever is accepted obeys the rules.
    #[test]
    fn order_lines_from_any_json_obey_the_rules(json in json_value()) {
        let text = json.to_string();
        if let Ok(order) = serde_json::from_str::<OrderLines>(&text) {
            let lines = order.as_slice();
            prop_assert!((1..=50).contains(&lines.len()));
            let skus: std::collections::HashSet<_> = lines.iter().map(|l| &l.sku).collect();
            prop_assert_eq!(skus.len(), lines.len());
        }
    }

    /// Redis names one (user, Idempotency-Key) record per pair: no two pairs share a key,
    /// whatever ':' the user id and the key contain.
    #[test]
    fn idempotency_records_never_collide(
        u1 in "[a:]{1,6}", k1 in "[b:]{1,6}", u2 in "[a:]{1,6}", k2 in "[b:]{1,6}",
    ) {
        let keys = Keys::new(&Namespace::parse("ns").unwrap());
        let pair = |u: &str, k: &str| (UserId::parse(u).unwrap(), IdempotencyKey::parse(k).unwrap());
        let (a, b) = (pair(&u1, &k1), pair(&u2, &k2));
        prop_assert_eq!(keys.idem(&a.0, &a.1) == keys.idem(&b.0, &b.1), a == b);
    }
}

/// Any JSON value, biased toward arrays of line-shaped objects.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        (1i64..=3).prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        any_string(SKU_ALPHABET, 8).prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(select(vec!["sku", "qty", "x"]), inner, 0..4).prop_map(
                |m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            ),
        ]
    })
}

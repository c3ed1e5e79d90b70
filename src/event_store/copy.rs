//! Events as a pass receives them: [`EventBatch`], decoded from query rows
//! or from binary `COPY` data (whose format this module parses). Pure
//! decoding: no SQL, no database access.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;

use crate::event_store::Event;
use crate::{Error, Result};

/// Events read by a pass, with, for each, its `xact_id` (as text) when it
/// is at or above the pass snapshot's xmin and so must be recorded in
/// `coord.applied_ahead` once applied.
#[derive(Clone, Debug, Default)]
pub struct EventBatch {
    /// The events, in position order.
    pub events: Vec<Event>,
    /// `xacts[i]` belongs to `events[i]`.
    pub xacts: Vec<Option<String>>,
}

impl EventBatch {
    /// Decodes rows of [`PassQuery::read_rows`](crate::event_store::PassQuery::read_rows).
    ///
    /// # Errors
    /// Decoding errors.
    pub fn decode(rows: &[Row]) -> Result<Self> {
        let mut batch = EventBatch {
            events: Vec::with_capacity(rows.len()),
            xacts: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            batch.events.push(Event::try_from(row)?);
            batch.xacts.push(row.try_get(7)?);
        }
        Ok(batch)
    }

    /// Decodes the binary `COPY` data of [`PassQuery::read_copy`](crate::event_store::PassQuery::read_copy).
    ///
    /// # Errors
    /// Malformed data.
    pub fn decode_copy(data: &[u8]) -> Result<Self> {
        Self::decode_copy_with(data, true)
    }

    /// Like [`EventBatch::decode_copy`]; with `payload` false, `data` and
    /// `metadata` are left `null` instead of parsed (for projectors that
    /// do not read them, see [`Projector::replay_reads_payload`](crate::Projector::replay_reads_payload)).
    /// Either way a SQL `NULL` in their place (what a [`PassQuery`](crate::PassQuery)
    /// sends instead of what the projector does not read) decodes as `null`.
    ///
    /// # Errors
    /// Malformed data.
    pub fn decode_copy_with(data: &[u8], payload: bool) -> Result<Self> {
        Self::decode_copy_rows(data, 0, payload)
    }

    /// Like [`EventBatch::decode_copy_with`], for data known to hold about
    /// `rows` events (the count [`PassQuery::read_copy_into`](crate::event_store::PassQuery::read_copy_into)
    /// returns): the batch is allocated at that size at once.
    ///
    /// # Errors
    /// Malformed data.
    pub fn decode_copy_rows(data: &[u8], rows: usize, payload: bool) -> Result<Self> {
        let payload = if payload {
            Payload::Whole
        } else {
            Payload::Nothing
        };
        Self::decode_copy_payload(data, rows, &payload)
    }

    /// Like [`EventBatch::decode_copy_rows`], decoding of each event's
    /// payload what `payload` says.
    ///
    /// # Errors
    /// Malformed data.
    pub fn decode_copy_payload(data: &[u8], rows: usize, payload: &Payload) -> Result<Self> {
        match copy_start(data)? {
            Some(start) => decode_tuples(data, start, rows, payload),
            None => Ok(EventBatch::default()),
        }
    }
}

/// What a pass decodes of each event's `data` and `metadata`, as the
/// projector declares it ([`Projector::replay_reads_payload`](crate::Projector::replay_reads_payload),
/// [`Projector::replay_reads_data_keys`](crate::Projector::replay_reads_data_keys)).
/// A SQL `NULL` in their place decodes as `null` whatever this says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Both, whole.
    Whole,
    /// Neither: both `null`.
    Nothing,
    /// `metadata` whole; of a `data` object only these top-level keys, the
    /// others skipped without being built (decision 0093). A `data` that
    /// is not an object is decoded whole.
    DataKeys(Vec<String>),
}

/// A `jsonb` value in binary form (a version byte, then JSON text).
fn jsonb_text(raw: &[u8]) -> Result<&[u8]> {
    match raw.split_first() {
        Some((1, text)) => Ok(text),
        _ => Err(malformed("unsupported jsonb version")),
    }
}

/// `json` (an object) with only the top-level `keys`; anything else whole.
fn with_keys(json: &[u8], keys: &[String]) -> serde_json::Result<serde_json::Value> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return serde_json::from_slice(json);
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = (&mut de).deserialize_map(KeptKeys(keys))?;
    de.end()?;
    Ok(value)
}

/// Builds an object of the entries whose key is one of its keys, skipping
/// the others' values.
struct KeptKeys<'k>(&'k [String]);

impl<'de> Visitor<'de> for KeptKeys<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(KeyIndex(self.0))? {
            match key {
                Some(i) => {
                    kept.insert(self.0[i].clone(), map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(serde_json::Value::Object(kept))
    }
}

/// A key's index among the kept keys, compared without allocating.
struct KeyIndex<'k>(&'k [String]);

impl<'de> DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| k == key))
    }
}

/// Decodes the tuples of binary `COPY` data from offset `at` (the first
/// tuple's start) into a batch allocated for `capacity` events.
fn decode_tuples(data: &[u8], at: usize, capacity: usize, payload: &Payload) -> Result<EventBatch> {
    let decoded = !matches!(payload, Payload::Nothing);
    let data_keys = match payload {
        Payload::DataKeys(keys) => Some(keys.as_slice()),
        Payload::Whole | Payload::Nothing => None,
    };
    // Column `i`, `null` when not decoded; of an object only `keys`.
    let json = |f: &[Option<&[u8]>], i: usize, keys: Option<&[String]>| match f.get(i) {
        Some(Some(raw)) if decoded => match keys {
            Some(keys) => with_keys(jsonb_text(raw)?, keys)
                .map_err(|e| malformed(&format!("column {i}: {e}"))),
            None => field(f, i, &Type::JSONB),
        },
        Some(_) => Ok(serde_json::Value::Null),
        None => Err(malformed("too few columns")),
    };
    let mut batch = EventBatch {
        events: Vec::with_capacity(capacity),
        xacts: Vec::with_capacity(capacity),
    };
    walk_tuples(data, at, usize::MAX, |f| {
        batch.events.push(Event {
            position: field(f, 0, &Type::INT8)?,
            stream_id: field(f, 1, &Type::TEXT)?,
            stream_version: field(f, 2, &Type::INT8)?,
            event_type: field(f, 3, &Type::TEXT)?,
            data: json(f, 4, data_keys)?,
            metadata: json(f, 5, None)?,
            recorded_at: field(f, 6, &Type::TIMESTAMPTZ)?,
        });
        batch.xacts.push(field(f, 7, &Type::TEXT)?);
        Ok(())
    })?;
    Ok(batch)
}

fn malformed(what: &str) -> Error {
    Error::Failed(format!("malformed COPY data from the event store: {what}"))
}

pub(crate) fn field<'a, T: FromSql<'a>>(
    fields: &[Option<&'a [u8]>],
    i: usize,
    ty: &Type,
) -> Result<T> {
    let raw = *fields.get(i).ok_or_else(|| malformed("too few columns"))?;
    let value = match raw {
        Some(bytes) => T::from_sql(ty, bytes),
        None => T::from_sql_null(ty),
    };
    value.map_err(|e| malformed(&format!("column {i}: {e}")))
}

/// Calls `each` with the fields of every tuple of binary `COPY` data;
/// returns the number of tuples.
#[cfg(test)]
pub(crate) fn walk_copy<'a>(
    data: &'a [u8],
    each: impl FnMut(&[Option<&'a [u8]>]) -> Result<()>,
) -> Result<usize> {
    match copy_start(data)? {
        Some(start) => Ok(walk_tuples(data, start, usize::MAX, each)?.0),
        None => Ok(0),
    }
}

/// The offset of the first tuple of binary `COPY` data, after its header;
/// `None` for no data at all.
fn copy_start(data: &[u8]) -> Result<Option<usize>> {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    if data.is_empty() {
        return Ok(None);
    }
    let header = data.get(..19).ok_or_else(|| malformed("truncated"))?;
    if &header[..SIGNATURE.len()] != SIGNATURE {
        return Err(malformed("bad signature"));
    }
    let ext = u32::from_be_bytes(header[15..19].try_into().expect("4 bytes")) as usize;
    Ok(Some(19 + ext))
}

/// Calls `each` with the fields of at most `max_rows` tuples of binary
/// `COPY` data from offset `at`, stopping at the trailer; returns the
/// number of tuples and the offset after the last one.
fn walk_tuples<'a>(
    data: &'a [u8],
    mut at: usize,
    max_rows: usize,
    mut each: impl FnMut(&[Option<&'a [u8]>]) -> Result<()>,
) -> Result<(usize, usize)> {
    let take = |at: usize, n: usize| -> Result<&'a [u8]> {
        data.get(at..at + n).ok_or_else(|| malformed("truncated"))
    };
    let mut fields = Vec::with_capacity(8);
    let mut rows = 0;
    while rows < max_rows {
        let count = i16::from_be_bytes(take(at, 2)?.try_into().expect("2 bytes"));
        if count < 0 {
            break;
        }
        at += 2;
        fields.clear();
        for _ in 0..count {
            let len = i32::from_be_bytes(take(at, 4)?.try_into().expect("4 bytes"));
            at += 4;
            if len < 0 {
                fields.push(None);
            } else {
                let len = len as usize;
                fields.push(Some(take(at, len)?));
                at += len;
            }
        }
        each(&fields)?;
        rows += 1;
    }
    Ok((rows, at))
}

/// Cuts binary `COPY` data of events (position first) to the tuples that
/// fit `max_bytes` (the bytes of their tuples, always at least one tuple)
/// and ends it with the trailer. `data` may end inside a tuple only when
/// `complete` is false (a prefix of a longer `COPY`). Returns the tuples
/// kept and the last one's position; `None` when `data` holds no complete
/// tuple yet and is not `complete`.
pub(crate) fn cut_copy(
    data: &mut Vec<u8>,
    max_bytes: usize,
    complete: bool,
) -> Result<Option<(usize, Option<i64>)>> {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    if data.is_empty() && complete {
        return Ok(Some((0, None)));
    }
    let bytes: &[u8] = data;
    let take = |at: usize, n: usize| bytes.get(at..at + n);
    let truncated = || Err(malformed("truncated"));
    let Some(header) = take(0, 19) else {
        return if complete { truncated() } else { Ok(None) };
    };
    if &header[..SIGNATURE.len()] != SIGNATURE {
        return Err(malformed("bad signature"));
    }
    let ext = u32::from_be_bytes(header[15..19].try_into().expect("4 bytes")) as usize;
    let start = 19 + ext;
    let (mut at, mut rows, mut last) = (start, 0, None);
    // Whether the walk stopped short of the trailer: `Some(true)` for data
    // that ended first, `Some(false)` for the budget.
    let stop = loop {
        let Some(count) = take(at, 2) else {
            break Some(true);
        };
        let count = i16::from_be_bytes(count.try_into().expect("2 bytes"));
        if count < 0 {
            break None;
        }
        let mut end = at + 2;
        let mut position = None;
        let mut whole = true;
        for i in 0..count {
            let Some(len) = take(end, 4) else {
                whole = false;
                break;
            };
            let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
            end += 4;
            if len > 0 {
                let len = len as usize;
                let Some(value) = take(end, len) else {
                    whole = false;
                    break;
                };
                if i == 0 {
                    position = Some(field::<i64>(&[Some(value)], 0, &Type::INT8)?);
                }
                end += len;
            }
        }
        if !whole {
            break Some(true);
        }
        if rows > 0 && end - start > max_bytes {
            break Some(false);
        }
        rows += 1;
        last = position;
        at = end;
    };
    if let Some(short) = stop {
        if short && complete {
            return truncated();
        }
        if rows == 0 {
            return Ok(None);
        }
        data.truncate(at);
        data.extend_from_slice(&(-1_i16).to_be_bytes());
    }
    Ok(Some((rows, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(tuples: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend_from_slice(&0_u32.to_be_bytes());
        data.extend_from_slice(&0_u32.to_be_bytes());
        for tuple in tuples {
            data.extend_from_slice(&(tuple.len() as i16).to_be_bytes());
            for field in tuple {
                match field {
                    Some(bytes) => {
                        data.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        data.extend_from_slice(bytes);
                    }
                    None => data.extend_from_slice(&(-1_i32).to_be_bytes()),
                }
            }
        }
        data.extend_from_slice(&(-1_i16).to_be_bytes());
        data
    }

    #[test]
    fn binary_copy_data_decodes_into_events() {
        let position = 42_i64.to_be_bytes();
        let version = 3_i64.to_be_bytes();
        let time = 0_i64.to_be_bytes();
        let data = copy_data(&[vec![
            Some(&position),
            Some(b"acct-1"),
            Some(&version),
            Some(b"MoneyDeposited"),
            Some(b"\x01{\"amount\": 5}"),
            Some(b"\x01{}"),
            Some(&time),
            None,
        ]]);
        let batch = EventBatch::decode_copy(&data).unwrap();
        assert_eq!(batch.events.len(), 1);
        let event = &batch.events[0];
        assert_eq!(
            (
                event.position,
                event.stream_id.as_str(),
                event.stream_version
            ),
            (42, "acct-1", 3)
        );
        assert_eq!(event.data["amount"], 5);
        assert_eq!(batch.xacts, [None]);
        assert_eq!(EventBatch::decode_copy(&[]).unwrap().events.len(), 0);
    }

    #[test]
    fn data_keeps_only_the_named_keys_of_an_object_and_anything_else_whole() {
        let keys = ["amount".to_string(), "to\"x".to_string()];
        let kept = |json: &str| with_keys(json.as_bytes(), &keys).unwrap();
        assert_eq!(
            kept(r#"{"note": "n", "amount": {"value": [1, 2]}, "x": null, "to\"x": 3}"#),
            serde_json::json!({"amount": {"value": [1, 2]}, "to\"x": 3})
        );
        // An escaped key is compared unescaped.
        assert_eq!(
            kept(r#"{"\u0061mount": 7}"#),
            serde_json::json!({ "amount": 7 })
        );
        assert_eq!(kept(r#"  {"other": 1}"#), serde_json::json!({}));
        assert_eq!(kept("[1, 2]"), serde_json::json!([1, 2]));
        assert_eq!(kept("5"), serde_json::json!(5));
        assert_eq!(kept(r#""amount""#), serde_json::json!("amount"));
        assert!(with_keys(br#"{"amount": 1} x"#, &keys).is_err());
        assert!(with_keys(br#"{"amount": "#, &keys).is_err());
    }

    #[test]
    fn named_data_keys_apply_to_data_not_metadata() {
        let position = 1_i64.to_be_bytes();
        let zero = 0_i64.to_be_bytes();
        let tuple = |data: &'static [u8]| {
            vec![
                Some(&position[..]),
                Some(&b"s"[..]),
                Some(&zero[..]),
                Some(&b"T"[..]),
                Some(data),
                Some(&b"\x01{\"amount\": 1, \"trace\": 2}"[..]),
                Some(&zero[..]),
                None,
            ]
        };
        let copy = copy_data(&[
            tuple(b"\x01{\"amount\": 5, \"note\": \"long\"}"),
            tuple(b"\x01[\"amount\"]"),
        ]);
        let keys = Payload::DataKeys(vec!["amount".into()]);
        let batch = EventBatch::decode_copy_payload(&copy, 2, &keys).unwrap();
        let data: Vec<_> = batch.events.iter().map(|e| e.data.clone()).collect();
        assert_eq!(
            data,
            [
                serde_json::json!({"amount": 5}),
                serde_json::json!(["amount"])
            ]
        );
        assert_eq!(
            batch.events[0].metadata,
            serde_json::json!({"amount": 1, "trace": 2})
        );
        let whole = EventBatch::decode_copy_payload(&copy, 2, &Payload::Whole).unwrap();
        assert_eq!(
            whole.events[0].data,
            serde_json::json!({"amount": 5, "note": "long"})
        );
        let bad_version = copy_data(&[tuple(b"\x02{\"amount\": 5}")]);
        assert!(EventBatch::decode_copy_payload(&bad_version, 1, &keys).is_err());
    }

    /// Binary `COPY` data of `n` bank events as the benchmark stores them.
    fn bank_copy_data(n: usize) -> Vec<u8> {
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend_from_slice(&0_u32.to_be_bytes());
        data.extend_from_slice(&0_u32.to_be_bytes());
        let note = "x".repeat(150);
        for i in 0..n {
            let payload = format!(
                "\u{1}{{\"note\": \"{note}\", \"amount\": {}, \"currency\": \"EUR\"}}",
                i % 97 + 1
            );
            let fields: [Vec<u8>; 7] = [
                (i as i64).to_be_bytes().to_vec(),
                format!("acct-{}", i % 10_000).into_bytes(),
                ((i / 10_000) as i64).to_be_bytes().to_vec(),
                b"MoneyDeposited".to_vec(),
                payload.into_bytes(),
                b"\x01{}".to_vec(),
                0_i64.to_be_bytes().to_vec(),
            ];
            data.extend_from_slice(&8_i16.to_be_bytes());
            for f in &fields {
                data.extend_from_slice(&(f.len() as i32).to_be_bytes());
                data.extend_from_slice(f);
            }
            data.extend_from_slice(&(-1_i32).to_be_bytes());
        }
        data.extend_from_slice(&(-1_i16).to_be_bytes());
        data
    }

    /// The decoding cost per event (`cargo test --release --lib
    /// decoding_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn decoding_cost() {
        let n = 200_000;
        let data = bank_copy_data(n);
        for payload in [
            Payload::Whole,
            Payload::Nothing,
            Payload::DataKeys(vec!["amount".into()]),
        ] {
            let started = std::time::Instant::now();
            let batch = EventBatch::decode_copy_payload(&data, n, &payload).unwrap();
            let decoded = started.elapsed();
            let started = std::time::Instant::now();
            drop(batch);
            let dropped = started.elapsed();
            println!(
                "payload {payload:?}: decode {:.0} ns/event, drop {:.0} ns/event",
                decoded.as_nanos() as f64 / n as f64,
                dropped.as_nanos() as f64 / n as f64
            );
        }
        let started = std::time::Instant::now();
        let rows = walk_copy(&data, |_| Ok(())).unwrap();
        println!(
            "walk only: {:.0} ns/event",
            started.elapsed().as_nanos() as f64 / rows as f64
        );
        #[derive(serde::Deserialize)]
        struct Amount {
            amount: i64,
        }
        let started = std::time::Instant::now();
        let mut sum = 0;
        walk_copy(&data, |f| {
            let raw = f[4].unwrap();
            let a: Amount = serde_json::from_slice(&raw[1..]).unwrap();
            sum += a.amount;
            Ok(())
        })
        .unwrap();
        println!(
            "typed data.amount only: {:.0} ns/event ({sum})",
            started.elapsed().as_nanos() as f64 / n as f64
        );
        let started = std::time::Instant::now();
        walk_copy(&data, |f| {
            let raw = f[4].unwrap();
            let v: serde_json::Value = serde_json::from_slice(&raw[1..]).unwrap();
            sum += v["amount"].as_i64().unwrap();
            Ok(())
        })
        .unwrap();
        println!(
            "Value data only (parse + drop): {:.0} ns/event",
            started.elapsed().as_nanos() as f64 / n as f64
        );
    }

    #[test]
    fn truncated_copy_data_is_an_error_not_a_panic() {
        let data = copy_data(&[vec![Some(b"12345678")]]);
        assert!(walk_copy(&data[..data.len() - 5], |_| Ok(())).is_err());
        assert!(walk_copy(b"PGCOPY", |_| Ok(())).is_err());
    }

    #[test]
    fn copy_data_is_cut_to_the_byte_budget_keeping_one_tuple_at_least() {
        let positions: Vec<[u8; 8]> = (1..=4_i64).map(|p| p.to_be_bytes()).collect();
        let tuples: Vec<Vec<Option<&[u8]>>> = positions
            .iter()
            .map(|p| vec![Some(&p[..]), Some(&b"0123456789"[..])])
            .collect();
        // Each tuple: 2 + (4 + 8) + (4 + 10) = 28 bytes.
        let full = copy_data(&tuples);
        let mut data = full.clone();
        assert_eq!(
            cut_copy(&mut data, 1 << 20, true).unwrap(),
            Some((4, Some(4)))
        );
        assert_eq!(data, full);
        let mut data = full.clone();
        assert_eq!(cut_copy(&mut data, 60, true).unwrap(), Some((2, Some(2))));
        assert_eq!(walk_copy(&data, |_| Ok(())).unwrap(), 2);
        let mut data = full.clone();
        assert_eq!(cut_copy(&mut data, 1, true).unwrap(), Some((1, Some(1))));
        // A prefix ending inside the first tuple holds nothing yet; one
        // ending inside the third keeps two.
        let mut data = full[..30].to_vec();
        assert_eq!(cut_copy(&mut data, 1, false).unwrap(), None);
        let mut data = full[..19 + 8 + 28 * 2 + 5].to_vec();
        assert_eq!(
            cut_copy(&mut data, 1 << 20, false).unwrap(),
            Some((2, Some(2)))
        );
        assert_eq!(walk_copy(&data, |_| Ok(())).unwrap(), 2);
        let mut data = full[..40].to_vec();
        assert!(cut_copy(&mut data, 1 << 20, true).is_err());
    }
}

//! The key layout of the sled store, shared by the store and by the audit's
//! own reader of a store folder (see the table in `sled_store`).

/// Separates the parts of a key.
pub(crate) const SEP: u8 = 0;

/// `{prefix}·{part}·{part}…`
pub(crate) fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for part in parts {
        k.push(SEP);
        k.extend_from_slice(part);
    }
    k
}

/// `V·format`: the store's format number.
pub(crate) fn format_key() -> Vec<u8> {
    key(b'V', &[b"format"])
}

/// `V·secret`: the store's own random secret (see `Store::secret`).
pub(crate) fn secret_key() -> Vec<u8> {
    key(b'V', &[b"secret"])
}

/// `C·{case}`: the case record.
pub(crate) fn case_key(id: &str) -> Vec<u8> {
    key(b'C', &[id.as_bytes()])
}

/// `H·{case}·`: the start of a case's history keys.
pub(crate) fn history_prefix(id: &str) -> Vec<u8> {
    let mut k = key(b'H', &[id.as_bytes()]);
    k.push(SEP);
    k
}

/// `H·{case}·{sequence u64 BE}`: one history entry.
pub(crate) fn history_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = history_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The case id and sequence number of a history key `H·{case}·{sequence u64}`
/// (a malformed key: the id up to its last separator, no sequence).
pub(crate) fn split_history_key(key: &[u8]) -> (&[u8], Option<u64>) {
    let body = key.get(2..).unwrap_or_default();
    if let Some(n) = body.len().checked_sub(9)
        && body[n] == SEP
    {
        let seq = <[u8; 8]>::try_from(&body[n + 1..])
            .ok()
            .map(u64::from_be_bytes);
        return (&body[..n], seq);
    }
    match body.iter().rposition(|b| *b == SEP) {
        Some(n) => (&body[..n], None),
        None => (body, None),
    }
}

/// The smallest key greater than every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_key_splits_back_into_its_case_and_sequence() {
        let k = history_key("bl-1/0", 42);
        assert_eq!(split_history_key(&k), (&b"bl-1/0"[..], Some(42)));
        assert!(k.starts_with(&history_prefix("bl-1/0")));
        assert!(prefix_end(&history_prefix("bl-1/0")).as_slice() > k.as_slice());
    }
}

//! A `NodeList` body cut into its items as the bytes arrive, so the listing is
//! decoded one Node at a time and never held whole. The API server answers a
//! `resourceVersion=0` list from its watch cache in one response (43.5 MB at
//! 5,000 real Nodes); decoding it whole (kube-rs's `list`, or serde_json on the
//! collected body) held the body, its text copy and the decoded list at once
//! (96 MB peak RSS, measured). serde_json parses complete values only, and no
//! maintained crate splits a JSON array nested in an object from an async byte
//! stream, hence this small scanner: it tracks strings, escapes and nesting to
//! find where each element of the top-level `items` array begins and ends; each
//! element is then parsed by serde_json, and everything outside `items` is kept
//! (with `"items":[]`) so the list's own `metadata` is parsed by serde_json too.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitError(pub String);

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Before the top-level `{`.
    Start,
    /// Inside the top-level object, outside `items`.
    Top,
    /// Inside `items`, between elements.
    Between,
    /// Inside one element.
    Item,
    /// After the top-level `}`.
    Done,
}

/// Feed it the body's chunks in order; it calls back with each item's bytes.
pub struct ItemSplitter {
    mode: Mode,
    /// Nesting depth, counting the top-level object as 1.
    depth: u32,
    in_str: bool,
    esc: bool,
    /// The top-level object with the items left out.
    top: Vec<u8>,
    /// Where the last string at depth 1 began in `top` (its opening quote), to
    /// tell whether an array at depth 1 is the one under `"items"`.
    key_at: usize,
    /// The element being read, when it spans chunks.
    item: Vec<u8>,
    /// Elements seen.
    pub items: usize,
}

impl Default for ItemSplitter {
    fn default() -> Self {
        ItemSplitter::new()
    }
}

impl ItemSplitter {
    pub fn new() -> ItemSplitter {
        ItemSplitter {
            mode: Mode::Start,
            depth: 0,
            in_str: false,
            esc: false,
            top: Vec::with_capacity(256),
            key_at: 0,
            item: Vec::new(),
            items: 0,
        }
    }

    /// Scans one chunk; `each` gets every element completed in it.
    pub fn feed<E: From<SplitError>>(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        // Start of the current element within `chunk`, when it began here.
        let mut item_start: Option<usize> = if self.mode == Mode::Item { Some(0) } else { None };
        let mut top_start: Option<usize> = if self.mode == Mode::Top { Some(0) } else { None };
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if self.in_str {
                // Skip to the next quote or backslash.
                if self.esc {
                    self.esc = false;
                } else {
                    match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                        None => break,
                        Some(off) => {
                            i += off;
                            if chunk[i] == b'\\' {
                                self.esc = true;
                            } else {
                                self.in_str = false;
                            }
                        }
                    }
                }
                i += 1;
                continue;
            }
            match self.mode {
                Mode::Start => match b {
                    b'{' => {
                        self.mode = Mode::Top;
                        self.depth = 1;
                        self.top.push(b'{');
                        top_start = Some(i + 1);
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => return Err(SplitError("the list is not a JSON object".into()).into()),
                },
                Mode::Top => match b {
                    b'"' => {
                        self.in_str = true;
                        if self.depth == 1 {
                            let start = top_start.expect("top mode");
                            self.key_at = self.top.len() + (i - start);
                        }
                    }
                    b'[' if self.depth == 1 && self.is_items_key(chunk, top_start, i) => {
                        let start = top_start.take().expect("top mode");
                        self.top.extend_from_slice(&chunk[start..=i]);
                        self.mode = Mode::Between;
                        self.depth = 2;
                    }
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            let start = top_start.take().expect("top mode");
                            self.top.extend_from_slice(&chunk[start..=i]);
                            self.mode = Mode::Done;
                        }
                    }
                    _ => {}
                },
                Mode::Between => match b {
                    b'{' => {
                        self.mode = Mode::Item;
                        self.depth = 3;
                        item_start = Some(i);
                    }
                    b']' => {
                        self.mode = Mode::Top;
                        self.depth = 1;
                        self.top.push(b']');
                        top_start = Some(i + 1);
                    }
                    b',' | b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => return Err(SplitError(format!("item {} of the list is not an object", self.items)).into()),
                },
                Mode::Item => match b {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 2 {
                            let start = item_start.take().expect("item mode");
                            self.items += 1;
                            if self.item.is_empty() {
                                each(&chunk[start..=i])?;
                            } else {
                                self.item.extend_from_slice(&chunk[start..=i]);
                                let whole = std::mem::take(&mut self.item);
                                each(&whole)?;
                                self.item = whole;
                                self.item.clear();
                            }
                            self.mode = Mode::Between;
                        }
                    }
                    _ => {}
                },
                Mode::Done => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => return Err(SplitError("bytes after the end of the list".into()).into()),
                },
            }
            i += 1;
        }
        if let Some(start) = item_start {
            self.item.extend_from_slice(&chunk[start..]);
        }
        if let Some(start) = top_start {
            self.top.extend_from_slice(&chunk[start..]);
        }
        Ok(())
    }

    /// Whether the `[` at `chunk[i]` opens the value of the key `"items"`: the
    /// bytes since the last string at depth 1 are `"items"`, blanks and `:`.
    fn is_items_key(&self, chunk: &[u8], top_start: Option<usize>, i: usize) -> bool {
        let start = top_start.expect("top mode");
        // `top` followed by `chunk[start..]` is the object so far.
        let mut seen = Vec::new();
        if self.key_at < self.top.len() {
            seen.extend_from_slice(&self.top[self.key_at..]);
            seen.extend_from_slice(&chunk[start..i]);
        } else {
            seen.extend_from_slice(&chunk[start + (self.key_at - self.top.len())..i]);
        }
        let rest = seen.strip_prefix(b"\"items\"");
        rest.is_some_and(|r| r.iter().all(|c| matches!(c, b':' | b' ' | b'\t' | b'\r' | b'\n')) && r.contains(&b':'))
    }

    /// The list without its items (`"items":[]`), once the body has ended.
    pub fn finish(self) -> Result<Vec<u8>, SplitError> {
        if self.mode != Mode::Done || self.in_str {
            return Err(SplitError(format!("the list ended early, after {} items", self.items)));
        }
        Ok(self.top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn split_in(body: &[u8], chunk: usize) -> Result<(Vec<Value>, Value), SplitError> {
        let mut s = ItemSplitter::new();
        let mut items = Vec::new();
        for c in body.chunks(chunk.max(1)) {
            s.feed::<SplitError>(c, |b| {
                items.push(serde_json::from_slice(b).map_err(|e| SplitError(e.to_string()))?);
                Ok(())
            })?;
        }
        let top = s.finish()?;
        Ok((items, serde_json::from_slice(&top).map_err(|e| SplitError(e.to_string()))?))
    }

    /// Every chunking of a list with awkward strings gives back the same items
    /// and the list's own fields, as serde_json reads the whole body.
    #[test]
    fn items_and_metadata_at_every_chunk_size() {
        let list = json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "12345", "note": "a } ] { [ \" \\ quoted"},
            "items": [
                {"metadata": {"name": "a", "annotations": {"k": "{\"VtepMAC\":\"0e:00\"}", "items": "[1,2]"}}, "spec": {"podCIDRs": ["10.0.1.0/24"]}},
                {"metadata": {"name": "b\\\"}"}, "status": {"images": [{"names": ["x", "y"]}, {"names": []}]}},
                {}
            ],
            "trailer": [1, {"items": [9]}]
        });
        for pretty in [false, true] {
            let body = if pretty { serde_json::to_vec_pretty(&list) } else { serde_json::to_vec(&list) }.unwrap();
            for chunk in [1, 2, 3, 7, 64, body.len()] {
                let (items, top) = split_in(&body, chunk).unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
                assert_eq!(&Value::Array(items), &list["items"], "chunk {chunk}");
                let mut want = list.clone();
                want["items"] = json!([]);
                assert_eq!(top, want, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn empty_list_and_bad_bodies() {
        let (items, top) = split_in(br#"{"items":[],"metadata":{"resourceVersion":"7"}}"#, 5).unwrap();
        assert!(items.is_empty());
        assert_eq!(top["metadata"]["resourceVersion"], "7");
        let (items, _) = split_in(br#"{"kind":"NodeList","items":null}"#, 5).unwrap();
        assert!(items.is_empty());
        for (bad, why) in [
            (&br#"[{"a":1}]"#[..], "not a JSON object"),
            (br#"{"items":[1,2]}"#, "item 0 of the list is not an object"),
            (br#"{"items":[{"a":1},{"b":"#, "ended early, after 1 items"),
            (br#"{"items":[]} x"#, "after the end"),
        ] {
            let e = split_in(bad, 3).unwrap_err().to_string();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(bad));
        }
    }
}

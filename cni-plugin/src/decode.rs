//! Typed decoding of the JSON the runtime hands us. serde's own errors say
//! what was wrong but not where; these name the key path the way an operator
//! reads their conflist (`delegate.mtu`, `ipam.routes[0].dst`).

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Decodes `v` (found at `root`, empty for the document itself) into `T`. Keys
/// `T` does not know are passed to `ignored` with their full path.
pub fn typed<T: DeserializeOwned>(v: Value, root: &str, mut ignored: impl FnMut(String)) -> Result<T, String> {
    let join = |p: String| match (root.is_empty(), p.as_str()) {
        (true, _) => p,
        (false, "" | ".") => root.to_string(),
        (false, _) => format!("{root}.{p}"),
    };
    let mut report = |p: serde_ignored::Path<'_>| ignored(join(key_path(&p)));
    let de = serde_ignored::Deserializer::new(v, &mut report);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = join(e.path().to_string());
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." { inner } else { format!("{path}: {inner}") }
    })
}

/// `delegate.ipam.routes[0]`: serde_ignored's own rendering marks every
/// `Option` level with `?` and numbers sequences like keys.
fn key_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            s if s.is_empty() => key.clone(),
            s => format!("{s}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[serde(default)]
        list: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        n: u32,
    }

    #[test]
    fn errors_and_ignored_keys_carry_the_path() {
        let v = serde_json::json!({"list": [{"n": 1}, {"n": "x"}]});
        let e = typed::<Outer>(v, "top", |_| {}).unwrap_err();
        assert!(e.starts_with("top.list[1].n: invalid type: string"), "{e}");

        let mut seen = Vec::new();
        let v = serde_json::json!({"list": [{"n": 1, "extra": true}], "other": 2});
        let o = typed::<Outer>(v, "", |p| seen.push(p)).unwrap();
        assert_eq!(o.list.len(), 1);
        seen.sort();
        assert_eq!(seen, ["list[0].extra", "other"]);

        let e = typed::<Outer>(serde_json::json!("x"), "prevResult", |_| {}).unwrap_err();
        assert!(e.starts_with("prevResult: invalid type: string"), "{e}");
    }
}

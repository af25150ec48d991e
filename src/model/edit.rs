//! Edits of a site file that the CLI makes for the operator (`drain`, `rotate-key`): one field
//! of one host block set or removed, the rest of the text (comments, formatting, order) kept.
//! Pure: text in, text out; the caller checks the result as a whole and writes it.

/// `text` with `field` of the `kind "host"` block set to the KDL value `value` (replacing
/// every earlier `field`), or removed when `value` is None.
pub fn set_field(
    text: &str,
    kind: &str,
    host: &str,
    field: &str,
    value: Option<&str>,
) -> Result<String, String> {
    let mut doc: kdl::KdlDocument = text.parse().map_err(|e| format!("{e}"))?;
    let node = doc
        .nodes_mut()
        .iter_mut()
        .find(|n| {
            n.name().value() == kind
                && n.entries().first().and_then(|e| e.value().as_string()) == Some(host)
        })
        .ok_or_else(|| format!("{kind} {host:?} not found"))?;
    let kids = node.ensure_children();
    let at = kids.nodes().iter().position(|n| n.name().value() == field);
    kids.nodes_mut().retain(|n| n.name().value() != field);
    if let Some(v) = value {
        let add: kdl::KdlDocument = format!("    {field} {v}\n")
            .parse()
            .map_err(|e| format!("`{field} {v}`: {e}"))?;
        let new = add.nodes()[0].clone();
        // In the place of the field it replaces, or last.
        let at = at.unwrap_or(kids.nodes().len()).min(kids.nodes().len());
        kids.nodes_mut().insert(at, new);
    }
    Ok(doc.to_string())
}

/// A string as a quoted KDL value (always quoted, as the site files are written).
pub fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "// the site\ngateway \"gw1\" {\n    endpoint \"192.0.2.1\" // public\n    public-key \"AAA\"\n}\nnode \"c1\" {\n    public-key \"BBB\"\n}\n";

    #[test]
    fn a_field_is_set_in_place_added_last_or_removed_and_the_rest_is_kept() {
        let t = set_field(SITE, "gateway", "gw1", "public-key", Some(&quoted("CCC"))).unwrap();
        assert!(t.contains("    public-key \"CCC\"\n}"), "{t}");
        assert!(t.contains("// the site") && t.contains("// public"), "{t}");
        assert!(
            t.contains("public-key \"BBB\""),
            "other blocks untouched: {t}"
        );
        let t = set_field(&t, "node", "c1", "next-public-key", Some(&quoted("DDD"))).unwrap();
        assert!(
            t.contains("node \"c1\" {\n    public-key \"BBB\"\n    next-public-key \"DDD\""),
            "{t}"
        );
        let t = set_field(&t, "node", "c1", "next-public-key", None).unwrap();
        assert!(!t.contains("DDD"), "{t}");
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(
            set_field(SITE, "node", "c9", "drain", None).unwrap_err(),
            "node \"c9\" not found"
        );
    }
}

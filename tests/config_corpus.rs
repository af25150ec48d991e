//! Every file in tests/configs/invalid/ must fail validation with exactly the diagnostics
//! pinned in the `.err` file beside it (rendered text, file:line:col and caret included).
//! Every file in tests/configs/valid/, config.kdl.example and every ```kdl block of the README
//! must validate. `UPDATE_GOLDEN=1 cargo test` rewrites the `.err` files.

use appliance::model::config;
use std::path::{Path, PathBuf};

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn every_invalid_config_fails_with_its_pinned_positioned_errors() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let cases = files("tests/configs/invalid", "kdl");
    assert!(
        cases.len() >= 25,
        "the corpus must hold at least 25 configs, has {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let name = rel(case);
        let text = std::fs::read_to_string(case).unwrap();
        let report = match std::panic::catch_unwind(|| config::parse(&name, &text)) {
            Ok(Ok(_)) => {
                failures.push(format!("{name}: accepted, but it is in the invalid corpus"));
                continue;
            }
            Ok(Err(r)) => r,
            Err(_) => {
                failures.push(format!("{name}: the parser panicked"));
                continue;
            }
        };
        let rendered = report.render();
        assert!(
            rendered.contains(&format!("--> {name}:")),
            "{name}: no file:line:col in\n{rendered}"
        );
        let golden = case.with_extension("err");
        if update {
            std::fs::write(&golden, &rendered).unwrap();
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == rendered => {}
            Ok(want) => failures.push(format!(
                "{name}: diagnostics differ\n--- want\n{want}--- got\n{rendered}"
            )),
            Err(_) => failures.push(format!(
                "{name}: missing {} (run with UPDATE_GOLDEN=1)",
                rel(&golden)
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.kdl.example");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg =
        config::parse("config.kdl.example", &text).unwrap_or_else(|r| panic!("{}", r.render()));
    assert_eq!(cfg.gateways.len(), 2);
    assert_eq!(cfg.relays.len(), 1);
    assert_eq!(cfg.site.links, 4);
    assert_eq!(cfg.pools[0].count, 16);
    assert_eq!(cfg.nodes.iter().filter(|n| n.pool.is_some()).count(), 16);
}

#[test]
fn every_kdl_block_in_the_readme_validates() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in readme.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```kdl") => {
                current = Some((i + 1, String::new()))
            }
            Some((start, text)) if line.trim_start().starts_with("```") => {
                blocks.push((*start, std::mem::take(text)));
                current = None;
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    assert!(!blocks.is_empty(), "README.md has no ```kdl block");
    for (line, text) in blocks {
        let file = format!("README.md block at line {line}");
        // A user-data example (site file plus the `appliance` host block) goes through the
        // image's user-data validation, which parses its site part with the same parser.
        let result = if text.lines().any(|l| l.starts_with("appliance {")) {
            appliance::image::userdata::validate(
                &file,
                &text,
                &appliance::image::userdata::Who::default(),
            )
            .map(|_| ())
        } else {
            config::parse(&file, &text).map(|_| ())
        };
        if let Err(r) = result {
            panic!("{}", r.render());
        }
    }
}

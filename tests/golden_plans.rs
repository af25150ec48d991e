//! Golden plans: for each case in tests/golden/*/ (a config, a host name, an observed state),
//! the plan text and JSON must be exactly as committed (`plan.txt`, `plan.json`), or the
//! planner's refusal exactly as in `error.txt`. `UPDATE_GOLDEN=1 cargo test` rewrites them.

use appliance::intent::{one_shot, plan::diff, state::HostState};
use appliance::model::config;
use std::path::Path;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn plans_match_the_committed_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(root.join("tests/golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("host").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 5,
        "expected golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let cfg_path = read(&case.join("config")).trim().to_string();
        let cfg = config::parse(&cfg_path, &read(&root.join(&cfg_path)))
            .unwrap_or_else(|r| panic!("{}", r.render()));
        let host = read(&case.join("host")).trim().to_string();
        let observed: HostState = serde_json::from_str(&read(&case.join("observed.json"))).unwrap();
        let i = one_shot(&cfg, &host, &[]).unwrap();
        let (role, want) = (i.role, i.kernel);
        let outputs: Vec<(&str, String)> = match diff(&host, role, &want, &observed) {
            Ok(plan) => {
                // Applying the plan to the observed state must give the desired state: the
                // plan is complete, whatever its text says.
                let after = plan.simulate(&observed);
                assert_eq!(after.devices, want.devices, "{}", case.display());
                assert_eq!(after.addresses, want.addresses, "{}", case.display());
                assert_eq!(after.routes, want.routes, "{}", case.display());
                for (k, v) in &want.sysctls {
                    assert_eq!(
                        after.sysctls.get(k),
                        Some(v),
                        "{}: sysctl {k}",
                        case.display()
                    );
                }
                // and its revert must lead back to the observed state.
                let undo = appliance::intent::plan::Plan {
                    changes: plan.revert(plan.changes.len()),
                    ..plan.clone()
                };
                let back = undo.simulate(&after);
                assert_eq!(back.devices, observed.devices, "{}", case.display());
                assert_eq!(back.routes, observed.routes, "{}", case.display());
                assert_eq!(back.addresses, observed.addresses, "{}", case.display());
                vec![
                    ("plan.txt", plan.render_text()),
                    (
                        "plan.json",
                        plan.render_json(
                            None,
                            if plan.is_empty() {
                                "unchanged"
                            } else {
                                "planned"
                            },
                        ),
                    ),
                ]
            }
            Err(e) => vec![("error.txt", format!("{e}\n"))],
        };
        for (file, got) in outputs {
            let path = case.join(file);
            if update {
                std::fs::write(&path, &got).unwrap();
            } else if !path.exists() || read(&path) != got {
                failures.push(format!(
                    "{}: {file} differs (UPDATE_GOLDEN=1 to accept)\n{got}",
                    case.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

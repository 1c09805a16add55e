//! Load generators of the `govflow` binary: the crash-test worker (and the
//! benchmark, in `bench`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;

use govflow::engine::durable::{Engine, FireRequest, Monotonic, StartRequest, SystemClock};
use govflow::lang::load::load;
use govflow::store::{SledStore, Store};

/// Opens the engine on a sled store in `data` with the workflows of `workflows`.
pub fn open_engine(data: &Path, workflows: &Path) -> Result<Engine> {
    let sources = load(&[workflows.to_path_buf()])?;
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(data).with_context(|| format!("opening {}", data.display()))?);
    Engine::open(store, &sources, Arc::new(Monotonic::new(SystemClock))).map_err(|e| match e {
        govflow::engine::durable::EngineError::Invalid(diagnostics) => {
            let text: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("the workflows do not validate:\n{}", text.join("\n"))
        }
        other => other.into(),
    })
}

fn ack(case: &str, sequence: u64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ack {case} {sequence}");
    let _ = out.flush();
}

/// Commits steps of the `tests/data/engine` workflows from many tasks until
/// killed, printing `ack CASE SEQUENCE` after each acknowledged step.
pub async fn crash_worker(data: &Path, workflows: &Path, run: u32, tasks: usize) -> Result<()> {
    let engine = open_engine(data, workflows)?;
    let handler = || [("handler".to_owned(), "hebei.sjz.zhengding".to_owned())].into();
    let mut running = Vec::new();
    for task in 0..tasks {
        let engine = engine.clone();
        running.push(tokio::spawn(async move {
            for i in 0u64.. {
                let id = format!("r{run}-t{task}-{i}");
                let case = engine
                    .start(StartRequest {
                        request_id: id.clone(),
                        case_id: id.clone(),
                        workflow: "ledger".into(),
                        agency: "hebei.sjz.zhengding".into(),
                        bindings: handler(),
                        variables: json!({"enterprise": format!("企业{i}")})
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    })
                    .await?;
                ack(&case.id, case.sequence);
                for n in 0..3 {
                    let case = engine
                        .fire(FireRequest {
                            request_id: format!("{id}-n{n}"),
                            case_id: id.clone(),
                            event: "note".into(),
                            agency: "hebei.sjz.zhengding".into(),
                            payload: json!({"text": "进展"})
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                            expected_sequence: Some(case.sequence + n),
                        })
                        .await?;
                    ack(&case.id, case.sequence);
                }
                if i % 3 == 0 {
                    let batch = format!("{id}-b");
                    let parent = engine
                        .start(StartRequest {
                            request_id: batch.clone(),
                            case_id: batch.clone(),
                            workflow: "batch".into(),
                            agency: "hebei.sjz.zhengding".into(),
                            bindings: handler(),
                            ..StartRequest::default()
                        })
                        .await?;
                    ack(&parent.id, parent.sequence);
                    let parent = engine
                        .fire(FireRequest {
                            request_id: format!("{batch}-d"),
                            case_id: batch.clone(),
                            event: "dispatch".into(),
                            agency: "hebei.sjz.zhengding".into(),
                            payload: json!({"items": ["甲", "乙"]})
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                            expected_sequence: None,
                        })
                        .await?;
                    ack(&parent.id, parent.sequence);
                    for child in &parent.children {
                        ack(&child.case_id, 1);
                        let done = engine
                            .fire(FireRequest {
                                request_id: format!("{}-f", child.case_id),
                                case_id: child.case_id.clone(),
                                event: "finish".into(),
                                agency: "hebei.sjz.zhengding".into(),
                                ..FireRequest::default()
                            })
                            .await?;
                        ack(&done.id, done.sequence);
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in running {
        task.await??;
    }
    Ok(())
}

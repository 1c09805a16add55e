//! What a workflow version is validated against once deployed: the agency
//! directory and catalogue files, the current source of every other
//! workflow, and the calendar. The engine validates deploys against it and
//! compiles older stored versions with it; the audit does the same offline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::load::{self, Document, Sources};
use super::validate::{CompiledWorkflow, validate_stored};
use crate::calendar::Calendar;

#[derive(Debug, Clone, Default)]
pub struct DeployedSources {
    /// Agency directory and catalogue files, as text.
    shared: Vec<(PathBuf, String)>,
    /// Workflow name → source text of its current version.
    current: BTreeMap<String, String>,
    calendar: Option<(PathBuf, Calendar)>,
}

impl DeployedSources {
    /// The files of a loaded folder, each workflow current.
    pub fn from_sources(sources: &Sources) -> DeployedSources {
        let mut deployed = DeployedSources {
            calendar: sources.calendar.clone(),
            ..DeployedSources::default()
        };
        for (index, document) in &sources.documents {
            let file = &sources.files[*index];
            match document {
                Document::Workflow(w) => {
                    deployed.current.insert(w.name.clone(), file.text.clone());
                }
                Document::Agencies(_) | Document::Catalogue(_) => {
                    deployed.shared.push((file.path.clone(), file.text.clone()));
                }
                Document::Scenario(_) => {}
            }
        }
        deployed
    }

    /// The name diagnostics give a deployed workflow's source.
    pub fn path_of(name: &str) -> PathBuf {
        PathBuf::from(format!("deployed/{name}.ron"))
    }

    /// The current source of a workflow.
    pub fn source(&self, name: &str) -> Option<&str> {
        self.current.get(name).map(String::as_str)
    }

    /// Makes `text` the current source of workflow `name`.
    pub fn set_current(&mut self, name: &str, text: String) {
        self.current.insert(name.to_owned(), text);
    }

    /// Everything deployed, with `text` as the workflow `name`.
    pub fn sources_with(&self, name: &str, text: &str) -> Sources {
        self.sources_with_file(name, &Self::path_of(name), text)
    }

    /// Like [`DeployedSources::sources_with`], with `text` read from `path` (which
    /// diagnostics name).
    pub fn sources_with_file(&self, name: &str, path: &Path, text: &str) -> Sources {
        let mut files = self.shared.clone();
        for (other, source) in &self.current {
            if other != name {
                files.push((Self::path_of(other), source.clone()));
            }
        }
        files.push((path.to_path_buf(), text.to_owned()));
        load::from_texts(files, self.calendar.clone())
    }

    /// A stored version of workflow `name`, compiled against what is
    /// deployed now; `None` when it no longer validates (rules added since
    /// it was stored only warn: [`super::validate::LATER_RULES`]).
    pub fn compile(&self, name: &str, source: &str) -> Option<Arc<CompiledWorkflow>> {
        validate_stored(&self.sources_with(name, source))
            .library
            .and_then(|l| l.workflows.get(name).cloned())
    }
}

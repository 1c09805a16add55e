//! The rules an offline audit runs with: the workflows folder (agency
//! directory, catalogues, calendar, current workflows) plus every version
//! deployed to the store, compiled the way `engine::durable` compiles them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::source::RecordSource;
use super::{AuditError, Result};
use crate::calendar::Calendar;
use crate::lang::load::{self, Document, Sources};
use crate::lang::validate::{Library, validate};
use crate::store::proto;

/// A library for auditing, and what is needed to validate a new version
/// against it (as the engine's deploy does).
pub struct AuditLibrary {
    /// The current workflows and every stored version that still compiles.
    pub library: Library,
    /// Digest → (workflow, version number) of every stored version.
    pub versions: BTreeMap<String, (String, u32)>,
    /// Stored versions that no longer compile against today's directory and
    /// catalogues: their cases cannot be replayed.
    pub unavailable: Vec<(String, u32)>,
    /// Agency directory and catalogue files, as text.
    shared: Vec<(PathBuf, String)>,
    /// Workflow name → source text of its current version.
    current: BTreeMap<String, String>,
    calendar: Option<(PathBuf, Calendar)>,
}

impl AuditLibrary {
    /// Loads the workflows folder and compiles the versions stored in `source`.
    pub fn load(workflows: &Path, source: &dyn RecordSource) -> Result<Self> {
        let sources = load::load(&[workflows.to_path_buf()])?;
        Self::from_sources(&sources, &source.workflow_versions()?)
    }

    /// Like [`AuditLibrary::load`], from sources already loaded.
    pub fn from_sources(sources: &Sources, stored: &[proto::WorkflowVersion]) -> Result<Self> {
        let validated = validate(sources);
        let Some(mut library) = validated.library else {
            return Err(AuditError::InvalidLibrary(validated.diagnostics));
        };
        let mut shared = Vec::new();
        let mut current = BTreeMap::new();
        for (index, document) in &sources.documents {
            let file = &sources.files[*index];
            match document {
                Document::Workflow(w) => {
                    current.insert(w.name.clone(), file.text.clone());
                }
                Document::Agencies(_) | Document::Catalogue(_) => {
                    shared.push((file.path.clone(), file.text.clone()));
                }
                Document::Scenario(_) => {}
            }
        }
        let mut audit = AuditLibrary {
            library: Library::default(),
            versions: stored
                .iter()
                .map(|v| (v.digest.clone(), (v.name.clone(), v.version)))
                .collect(),
            unavailable: Vec::new(),
            shared,
            current,
            calendar: sources.calendar.clone(),
        };
        // Older versions: compiled against today's directory, catalogues and
        // other workflows, as the engine does when it opens.
        for old in stored {
            if library.versions.contains_key(&old.digest) {
                continue;
            }
            match validate(&audit.sources_with(&old.name, &old.source))
                .library
                .and_then(|l| l.workflows.get(&old.name).cloned())
            {
                Some(compiled) => {
                    library.versions.insert(compiled.digest.clone(), compiled);
                }
                None => audit.unavailable.push((old.name.clone(), old.version)),
            }
        }
        audit.library = library;
        Ok(audit)
    }

    /// The current sources with `text` as the workflow `name`: what a deploy
    /// of `text` is validated against.
    pub fn sources_with(&self, name: &str, text: &str) -> Sources {
        self.sources_with_file(name, Path::new(&format!("deployed/{name}.ron")), text)
    }

    /// Like [`AuditLibrary::sources_with`], with `text` read from `path`
    /// (which diagnostics name).
    pub fn sources_with_file(&self, name: &str, path: &Path, text: &str) -> Sources {
        let mut files = self.shared.clone();
        for (other, source) in &self.current {
            if other != name {
                files.push((
                    PathBuf::from(format!("deployed/{other}.ron")),
                    source.clone(),
                ));
            }
        }
        files.push((path.to_path_buf(), text.to_owned()));
        load::from_texts(files, self.calendar.clone())
    }

    /// The version number a digest was deployed as.
    pub fn version_of(&self, digest: &str) -> Option<u32> {
        self.versions.get(digest).map(|(_, v)| *v)
    }
}

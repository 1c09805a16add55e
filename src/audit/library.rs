//! The rules an offline audit runs with: the workflows folder (agency
//! directory, catalogues, calendar, current workflows) plus every version
//! deployed to the store, compiled the way `engine::durable` compiles them.

use std::collections::BTreeMap;
use std::path::Path;

use super::source::RecordSource;
use super::{AuditError, Result};
use crate::lang::deployed::DeployedSources;
use crate::lang::load::{self, Sources};
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
    /// What a new version is validated against.
    pub deployed: DeployedSources,
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
        let deployed = DeployedSources::from_sources(sources);
        let mut unavailable = Vec::new();
        // Older versions: compiled against today's directory, catalogues and
        // other workflows, as the engine does when it opens.
        for old in stored {
            if library.versions.contains_key(&old.digest) {
                continue;
            }
            match deployed.compile(&old.name, &old.source) {
                Some(compiled) => {
                    library.versions.insert(compiled.digest.clone(), compiled);
                }
                None => unavailable.push((old.name.clone(), old.version)),
            }
        }
        Ok(AuditLibrary {
            library,
            versions: stored
                .iter()
                .map(|v| (v.digest.clone(), (v.name.clone(), v.version)))
                .collect(),
            unavailable,
            deployed,
        })
    }

    /// The version number a digest was deployed as.
    pub fn version_of(&self, digest: &str) -> Option<u32> {
        self.versions.get(digest).map(|(_, v)| *v)
    }
}

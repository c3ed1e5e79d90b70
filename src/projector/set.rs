//! [`ProjectorSet`]: the projectors one deployment runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::Config;
use crate::projector::{Projector, ProjectorExt, SqlProjector};
use crate::{Error, Result};

/// The projectors one deployment runs: its configuration `C` of
/// `name@version`s.
#[derive(Clone, Default)]
pub struct ProjectorSet {
    projectors: Vec<Arc<dyn Projector>>,
}

impl std::fmt::Debug for ProjectorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.projectors.iter().map(|p| p.label()))
            .finish()
    }
}

impl ProjectorSet {
    /// A set of projectors; names must be unique.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when two projectors share a name.
    pub fn new(projectors: Vec<Arc<dyn Projector>>) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for p in &projectors {
            if !seen.insert(p.name().clone()) {
                return Err(Error::InvalidInput(format!(
                    "projector {} is registered twice",
                    p.name()
                )));
            }
            if p.event_types().is_empty() {
                return Err(Error::InvalidInput(format!(
                    "projector {} handles no event types",
                    p.label()
                )));
            }
        }
        Ok(Self { projectors })
    }

    /// The config-defined projectors of `config`.
    pub fn from_config(config: &Config) -> Self {
        let projectors = config
            .projectors
            .iter()
            .map(|p| {
                Arc::new(SqlProjector::with_event_store(
                    p.clone(),
                    &config.event_store,
                )) as Arc<dyn Projector>
            })
            .collect();
        Self { projectors }
    }

    /// Adds the projectors of `other`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when a name is in both.
    pub fn merge(self, other: ProjectorSet) -> Result<Self> {
        let mut all = self.projectors;
        all.extend(other.projectors);
        Self::new(all)
    }

    /// The projectors, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Projector>> {
        self.projectors.iter()
    }

    /// The projector called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Projector>> {
        self.projectors.iter().find(|p| p.name().as_str() == name)
    }

    /// Number of projectors.
    pub fn len(&self) -> usize {
        self.projectors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.projectors.is_empty()
    }

    /// `{"name": "version", ...}`: the `projectors` argument of `coord.check_publish`.
    pub fn versions_json(&self) -> serde_json::Value {
        let map: BTreeMap<String, String> = self
            .projectors
            .iter()
            .map(|p| (p.name().to_string(), p.version().to_string()))
            .collect();
        serde_json::to_value(map).expect("a map of strings serialises")
    }
}

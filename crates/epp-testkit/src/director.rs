//! A director built from a configuration as the `epp` binary builds it, without servers:
//! for scheduling tests and benches that drive the request path in process.

use std::sync::Arc;

use endpoint_picker::config::EndpointPickerConfig;
use endpoint_picker::datalayer::EndpointStore;
use endpoint_picker::plugins::Defaults;
use endpoint_picker::requestcontrol::{Decision, Director, DirectorConfig, ObjectiveTable, Routing};

/// A director for `config` (YAML) with ties broken by `seed`, and its (empty, unsynced)
/// store with the plugins' hooks.
pub fn director(config: &str, seed: u64) -> (Director, Arc<EndpointStore>) {
    let set = EndpointPickerConfig::from_text(config, "test")
        .unwrap()
        .build(&Defaults::builtin(), Some(seed))
        .unwrap();
    let store = Arc::new(EndpointStore::with_hooks(set.store_hooks.clone()));
    let director = Director::new(
        store.clone(),
        Arc::new(set.scheduler),
        DirectorConfig::default(),
        set.control,
        Arc::new(ObjectiveTable::default()),
    );
    (director, store)
}

/// The decision of a routing step that must not wait.
pub fn ready(routing: Routing) -> Decision {
    match routing {
        Routing::Ready(d) => d,
        Routing::Wait(_) => panic!("the request was made to wait"),
    }
}

//! Plugin instances: the roles one configured plugin plays, its name and type, and what a
//! plugin factory is given to build it.
//!
//! A plugin is built once, at start-up, by one static factory (`crate::plugins::build`, a
//! `match` on the type name; no registry filled at init). The factory returns a
//! [`PluginRoles`]: one object, seen through every role it implements. The configuration
//! builder then places each role where it belongs (profiles, director, data layer), by name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::datalayer::{EndpointExtractor, Extractor, PollingSource, SubscribingSource};
use super::flowcontrol::{FairnessPolicy, OrderingPolicy, UsageLimitPolicy};
use super::requestcontrol::{DataProducer, EndpointsChanged, PreRequest, SaturationDetector};
use super::scheduling::{Filter, Picker, ProfileHandler, Scorer};
use crate::datalayer::StoreHook;

/// Observes one plugin call's duration.
pub type Timer = Arc<dyn Fn(Duration) + Send + Sync>;

/// A plugin role with the name and type it was configured under.
pub struct Named<T: ?Sized> {
    /// Configured plugin name.
    pub name: Arc<str>,
    /// Plugin type.
    pub type_name: Arc<str>,
    /// The plugin.
    pub plugin: Arc<T>,
    /// Duration observer (`inference_extension_plugin_duration_seconds`), when attached.
    pub timer: Option<Timer>,
}

impl<T: ?Sized> Named<T> {
    /// A named plugin without timer.
    pub fn new(name: Arc<str>, type_name: Arc<str>, plugin: Arc<T>) -> Self {
        Self {
            name,
            type_name,
            plugin,
            timer: None,
        }
    }

    /// Runs `f` on the plugin, timing it when a timer is attached.
    pub fn timed<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        match &self.timer {
            Some(timer) => {
                let start = std::time::Instant::now();
                let r = f(&self.plugin);
                timer(start.elapsed());
                r
            }
            None => f(&self.plugin),
        }
    }

    /// Attaches the timer `observer` gives for this plugin at `extension_point`.
    pub fn attach(&mut self, observer: &dyn PluginObserver, extension_point: &'static str) {
        self.timer = observer.plugin_timer(extension_point, &self.type_name, &self.name);
    }
}

impl<T: ?Sized> Clone for Named<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            type_name: self.type_name.clone(),
            plugin: self.plugin.clone(),
            timer: self.timer.clone(),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for Named<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Where plugin timings go. Timers are requested once per plugin when the EPP is wired, so
/// the request path does no label lookups.
pub trait PluginObserver: Send + Sync {
    /// A timer for `plugin_name` (of `plugin_type`) at `extension_point`, or `None`.
    fn plugin_timer(
        &self,
        extension_point: &'static str,
        plugin_type: &str,
        plugin_name: &str,
    ) -> Option<Timer>;
    /// One whole scheduling cycle took `elapsed`.
    fn cycle(&self, elapsed: Duration);
}

/// Work a plugin does on its own schedule, off the request path (a sweep of expired state).
/// The EPP runs each as an owned task from start-up until `cancel` fires; it uses tokio time.
pub trait Background: Send + Sync {
    /// Runs until `cancel` fires.
    fn run(
        self: Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Every role a plugin instance plays. Each role points at the same object.
#[derive(Clone, Default)]
pub struct PluginRoles {
    /// Filter.
    pub filter: Option<Arc<dyn Filter>>,
    /// Scorer.
    pub scorer: Option<Arc<dyn Scorer>>,
    /// Picker.
    pub picker: Option<Arc<dyn Picker>>,
    /// Profile handler.
    pub profile_handler: Option<Arc<dyn ProfileHandler>>,
    /// Data producer (runs before scheduling).
    pub producer: Option<Arc<dyn DataProducer>>,
    /// Pre-request hook.
    pub pre_request: Option<Arc<dyn PreRequest>>,
    /// Endpoint-set hook.
    pub endpoints_changed: Option<Arc<dyn EndpointsChanged>>,
    /// Saturation detector (admission).
    pub saturation: Option<Arc<dyn SaturationDetector>>,
    /// Polling data source.
    pub polling_source: Option<Arc<dyn PollingSource>>,
    /// Subscribing data source.
    pub subscribing_source: Option<Arc<dyn SubscribingSource>>,
    /// Extractor of a data source.
    pub extractor: Option<Arc<dyn Extractor>>,
    /// Store hook (per-endpoint state kept in the snapshot).
    pub store_hook: Option<Arc<dyn StoreHook>>,
    /// Work of its own, run as an owned task until shutdown.
    pub background: Option<Arc<dyn Background>>,
    /// Source of endpoint notifications (`endpoint-notification-source`).
    pub endpoint_source: bool,
    /// Extractor of endpoint notifications.
    pub endpoint_extractor: Option<Arc<dyn EndpointExtractor>>,
    /// Request parser (the OpenAI-style body parsing the EPP does).
    pub parser: bool,
    /// Flow-control ordering policy.
    pub ordering: Option<Arc<dyn OrderingPolicy>>,
    /// Flow-control fairness policy.
    pub fairness: Option<Arc<dyn FairnessPolicy>>,
    /// Flow-control usage limit policy.
    pub usage_limit: Option<Arc<dyn UsageLimitPolicy>>,
    /// The data kinds the plugin produces for others ([`DataKind`]).
    pub produces: Vec<DataKind>,
    /// Its other roles only serve its scorer (a no-hit LRU's recording, a session scorer's
    /// bindings): it counts as used only when a profile lists it.
    pub serves_scorer: bool,
    /// Scheduling profiles a parameter names, as `(parameter, profile)`: the configuration
    /// builder refuses a name that is not among `schedulingProfiles`.
    pub profile_refs: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for PluginRoles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.role_names().join("+"))
    }
}

impl PluginRoles {
    /// Whether the plugin takes part in a profile (filter, scorer or picker).
    pub fn is_profile_member(&self) -> bool {
        self.filter.is_some() || self.scorer.is_some() || self.picker.is_some()
    }

    /// The roles, for messages.
    pub fn role_names(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        let roles: [(&'static str, bool); 19] = [
            ("filter", self.filter.is_some()),
            ("scorer", self.scorer.is_some()),
            ("picker", self.picker.is_some()),
            ("profile handler", self.profile_handler.is_some()),
            ("data producer", self.producer.is_some()),
            ("pre-request", self.pre_request.is_some()),
            ("endpoint hook", self.endpoints_changed.is_some()),
            ("saturation detector", self.saturation.is_some()),
            ("polling source", self.polling_source.is_some()),
            ("subscribing source", self.subscribing_source.is_some()),
            ("extractor", self.extractor.is_some()),
            ("store hook", self.store_hook.is_some()),
            ("background task", self.background.is_some()),
            ("endpoint notification source", self.endpoint_source),
            ("endpoint extractor", self.endpoint_extractor.is_some()),
            ("parser", self.parser),
            ("ordering policy", self.ordering.is_some()),
            ("fairness policy", self.fairness.is_some()),
            ("usage limit policy", self.usage_limit.is_some()),
        ];
        for (name, on) in roles {
            if on {
                r.push(name);
            }
        }
        r
    }
}

/// Kinds of data one plugin produces and another consumes, bound by producer name when the
/// configuration is built (the reference's data keys with producer names; consumers name their
/// producer with a `...ProducerName` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataKind {
    /// Prefix-cache match per candidate (`PrefixMatch`).
    PrefixMatch,
    /// In-flight load per endpoint (`InFlightLoad`).
    InFlightLoad,
    /// The request's token ids (`TokenizedPrompt`).
    TokenizedPrompt,
}

impl DataKind {
    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::PrefixMatch => "prefix-cache match info",
            Self::InFlightLoad => "in-flight load",
            Self::TokenizedPrompt => "tokenized prompt",
        }
    }
}

/// Adds `read` to the readers of `name` in `map` (creating it with `help`).
fn push_reader(map: &mut BTreeMap<String, (String, Vec<GaugeFn>)>, name: &str, help: &str, read: GaugeFn) {
    map.entry(name.to_owned())
        .or_insert_with(|| (help.to_owned(), Vec::new()))
        .1
        .push(read);
}

/// Registers plugin-owned metric families. Plugins ask for them when they are built; families
/// with one name are shared by every instance (the reference registers each family once).
#[derive(Clone, Default)]
pub struct PluginMetrics {
    inner: Arc<Mutex<PluginFamilies>>,
}

/// The families registered so far.
#[derive(Default)]
pub struct PluginFamilies {
    /// Histograms by name: help and the shared histogram.
    pub histograms: BTreeMap<String, (String, Histogram)>,
    /// Gauges computed at scrape time: help and every instance's reader (summed).
    pub gauges: BTreeMap<String, (String, Vec<GaugeFn>)>,
    /// Counters computed at scrape time: help and every instance's reader (summed).
    pub counter_fns: BTreeMap<String, (String, Vec<GaugeFn>)>,
    /// Labelled counters by name: help and the shared family. Label values must come from a
    /// bounded set (configuration, fixed reasons), never from a client or a model server.
    pub counters: BTreeMap<String, (String, CounterFamily)>,
}

/// A counter family with free-form label pairs.
pub type CounterFamily = Family<Vec<(&'static str, String)>, Counter>;

/// Reads a gauge's current value.
pub type GaugeFn = Arc<dyn Fn() -> i64 + Send + Sync>;

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("PluginMetrics")
            .field("histograms", &inner.histograms.keys().collect::<Vec<_>>())
            .field("gauges", &inner.gauges.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PluginMetrics {
    /// The histogram `name` (created with `buckets` on first use).
    pub fn histogram(&self, name: &str, help: &str, buckets: impl Iterator<Item = f64>) -> Histogram {
        let mut inner = self.inner.lock();
        inner
            .histograms
            .entry(name.to_owned())
            .or_insert_with(|| (help.to_owned(), Histogram::new(buckets)))
            .1
            .clone()
    }

    /// A gauge `name` whose value is the sum of every registered `read`, computed when the
    /// metrics are scraped.
    pub fn gauge_fn(&self, name: &str, help: &str, read: GaugeFn) {
        push_reader(&mut self.inner.lock().gauges, name, help, read);
    }

    /// A counter `name` (without `_total`) whose value is the sum of every registered `read`,
    /// computed when the metrics are scraped: counters kept in the plugin's own atomics, so
    /// the request path touches no metric family.
    pub fn counter_fn(&self, name: &str, help: &str, read: GaugeFn) {
        push_reader(&mut self.inner.lock().counter_fns, name, help, read);
    }

    /// The counter family `name` (created on first use).
    pub fn counter(&self, name: &str, help: &str) -> CounterFamily {
        let mut inner = self.inner.lock();
        inner
            .counters
            .entry(name.to_owned())
            .or_insert_with(|| (help.to_owned(), CounterFamily::default()))
            .1
            .clone()
    }

    /// Runs `f` on the registered families.
    pub fn with<R>(&self, f: impl FnOnce(&PluginFamilies) -> R) -> R {
        f(&self.inner.lock())
    }
}

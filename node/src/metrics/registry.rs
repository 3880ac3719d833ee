//! Metrics that other parts of the node add at start: counters, gauges and
//! collectors rendered after the built-in families on every scrape.
//!
//! Registration takes a lock and happens at start; updating a registered
//! counter or gauge is one relaxed atomic operation and takes no lock, so
//! it is fit for any hot path. A [`Collector`] renders families whose
//! series are only known at scrape time (per-dataset figures, say).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use super::exposition::{MetricType, TextEncoder, valid_label_name, valid_metric_name};

/// Why a metric could not be registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Not `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    #[error("invalid metric name {0:?}")]
    InvalidName(String),
    /// Not `[a-zA-Z_][a-zA-Z0-9_]*`, or reserved (`__...`).
    #[error("metric {metric}: invalid label name {label:?}")]
    InvalidLabel {
        /// The metric.
        metric: String,
        /// The label name.
        label: String,
    },
    /// The name is already registered with another type.
    #[error("metric {name} is already registered as a {existing}")]
    TypeConflict {
        /// The metric.
        name: String,
        /// Its registered type.
        existing: &'static str,
    },
}

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, such as a queue length.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Adds `n` (negative to subtract).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Renders families of its own on every scrape. It must start each family
/// with [`TextEncoder::family`], use names no other metric uses, and be
/// quick: it runs on the scrape request.
pub trait Collector: Send + Sync {
    /// Writes this collector's families.
    fn collect(&self, out: &mut TextEncoder);
}

#[derive(Clone)]
enum Value {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
}

struct Family {
    kind: MetricType,
    help: String,
    /// Label pairs (sorted by name) and the value of each series.
    series: Vec<(Vec<(String, String)>, Value)>,
}

#[derive(Default)]
struct Inner {
    families: BTreeMap<String, Family>,
    collectors: Vec<Arc<dyn Collector>>,
}

/// The registry. See the module documentation.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.read();
        f.debug_struct("Registry")
            .field("families", &inner.families.keys().collect::<Vec<_>>())
            .field("collectors", &inner.collectors.len())
            .finish()
    }
}

impl Registry {
    /// The counter `name{labels}`, registered on first call; a later call
    /// with the same name and labels returns the same counter.
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Arc<Counter>, RegistryError> {
        match self.series(name, help, labels, MetricType::Counter)? {
            Value::Counter(c) => Ok(c),
            Value::Gauge(_) => Err(conflict(name, MetricType::Gauge)),
        }
    }

    /// The gauge `name{labels}`, registered on first call; a later call with
    /// the same name and labels returns the same gauge.
    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Arc<Gauge>, RegistryError> {
        match self.series(name, help, labels, MetricType::Gauge)? {
            Value::Gauge(g) => Ok(g),
            Value::Counter(_) => Err(conflict(name, MetricType::Counter)),
        }
    }

    /// Adds a collector, rendered after every registered family.
    pub fn collector(&self, collector: Arc<dyn Collector>) {
        self.inner.write().collectors.push(collector);
    }

    fn series(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        kind: MetricType,
    ) -> Result<Value, RegistryError> {
        if !valid_metric_name(name) {
            return Err(RegistryError::InvalidName(name.to_string()));
        }
        if let Some((bad, _)) = labels.iter().find(|(k, _)| !valid_label_name(k)) {
            return Err(RegistryError::InvalidLabel {
                metric: name.to_string(),
                label: bad.to_string(),
            });
        }
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        let mut inner = self.inner.write();
        let family = inner
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind,
                help: help.to_string(),
                series: Vec::new(),
            });
        if family.kind != kind {
            return Err(conflict(name, family.kind));
        }
        if let Some((_, v)) = family.series.iter().find(|(l, _)| *l == labels) {
            return Ok(v.clone());
        }
        let value = match kind {
            MetricType::Gauge => Value::Gauge(Arc::default()),
            _ => Value::Counter(Arc::default()),
        };
        family.series.push((labels, value.clone()));
        Ok(value)
    }

    /// Writes every registered family, then every collector's.
    pub fn render(&self, out: &mut TextEncoder) {
        let inner = self.inner.read();
        for (name, family) in &inner.families {
            out.family(name, family.kind, &family.help);
            for (labels, value) in &family.series {
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let v = match value {
                    Value::Counter(c) => c.get() as f64,
                    Value::Gauge(g) => g.get() as f64,
                };
                out.sample(name, &labels, v);
            }
        }
        for c in &inner.collectors {
            c.collect(out);
        }
    }
}

fn conflict(name: &str, existing: MetricType) -> RegistryError {
    RegistryError::TypeConflict {
        name: name.to_string(),
        existing: existing.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Collector for Fixed {
        fn collect(&self, out: &mut TextEncoder) {
            out.single("x_fixed", MetricType::Gauge, "Fixed.", 7.0);
        }
    }

    #[test]
    fn series_are_shared_grouped_and_rendered() -> Result<(), RegistryError> {
        let r = Registry::default();
        let a = r.counter("x_events_total", "Events.", &[("kind", "a")])?;
        let a_again = r.counter("x_events_total", "Events.", &[("kind", "a")])?;
        let b = r.counter("x_events_total", "Events.", &[("kind", "b")])?;
        let g = r.gauge("x_backlog", "Backlog.", &[])?;
        a.inc();
        a_again.add(2);
        b.inc();
        g.set(5);
        g.add(-2);
        r.collector(Arc::new(Fixed));
        let mut e = TextEncoder::new();
        r.render(&mut e);
        assert_eq!(
            e.finish(),
            "# HELP x_backlog Backlog.\n# TYPE x_backlog gauge\nx_backlog 3\n\
             # HELP x_events_total Events.\n# TYPE x_events_total counter\n\
             x_events_total{kind=\"a\"} 3\nx_events_total{kind=\"b\"} 1\n\
             # HELP x_fixed Fixed.\n# TYPE x_fixed gauge\nx_fixed 7\n"
        );
        Ok(())
    }

    #[test]
    fn bad_names_and_type_conflicts_are_refused() -> Result<(), RegistryError> {
        let r = Registry::default();
        r.counter("x_total", "X.", &[])?;
        assert!(matches!(
            r.gauge("x_total", "X.", &[]),
            Err(RegistryError::TypeConflict { .. })
        ));
        assert!(matches!(
            r.gauge("x-y", "X.", &[]),
            Err(RegistryError::InvalidName(_))
        ));
        assert!(matches!(
            r.gauge("x_y", "X.", &[("__name__", "v")]),
            Err(RegistryError::InvalidLabel { .. })
        ));
        Ok(())
    }
}

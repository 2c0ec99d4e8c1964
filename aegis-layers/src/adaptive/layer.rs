use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::Adaptive;
use super::classify::DefaultClassifier;
use super::window::Shared;

/// Wraps services in [`Adaptive`], which records their latency for one controller.
///
/// Get it from [`AdaptiveHandle::layer`](super::AdaptiveHandle::layer); cloning is
/// cheap (an `Arc`). See the [module docs](super) for an example.
#[derive(Clone)]
pub struct AdaptiveLayer<C = DefaultClassifier> {
    shared: Arc<Shared>,
    classifier: C,
}

impl<C> AdaptiveLayer<C> {
    pub(crate) fn new(shared: Arc<Shared>, classifier: C) -> Self {
        Self { shared, classifier }
    }
}

impl<C: fmt::Debug> fmt::Debug for AdaptiveLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLayer")
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone> Layer<S> for AdaptiveLayer<C> {
    type Service = Adaptive<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Adaptive::from_parts(inner, Arc::clone(&self.shared), self.classifier.clone())
    }
}

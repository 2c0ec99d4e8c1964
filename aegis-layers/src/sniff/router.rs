//! Routing by detected protocol.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::BoxError;
use pin_project_lite::pin_project;
use tokio::io::AsyncRead;
use tower_service::Service;

use super::future::ResponseFuture;
use super::{Protocols, Sniff, SniffError, SniffLayer, Sniffed};

/// The future of one routed connection: boxed, once per connection, because each route
/// is a different service type.
pub type RouteFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

type RouteFn<I> = dyn Fn(Sniffed<I>) -> RouteFuture + Send + Sync;

/// The route table of a [`SniffRouter`]: a service over [`Sniffed`] streams that calls
/// the first route whose protocols contain the detected one, and rejects the rest with
/// [`SniffError::NotAllowed`].
///
/// Each route's readiness is awaited inside the connection's future, on a clone of the
/// route, because the route is only known once the first bytes are read (as
/// `aegis_core::serve` does for each connection). `poll_ready` is therefore always
/// ready: no per-connection state can stall it.
pub struct Routes<I> {
    routes: Arc<Vec<(Protocols, Arc<RouteFn<I>>)>>,
}

impl<I> Clone for Routes<I> {
    fn clone(&self) -> Self {
        Self {
            routes: Arc::clone(&self.routes),
        }
    }
}

impl<I> fmt::Debug for Routes<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|(p, _)| p))
            .finish()
    }
}

impl<I> Routes<I> {
    fn allowed(&self) -> Protocols {
        self.routes
            .iter()
            .fold(Protocols::NONE, |acc, (p, _)| acc | *p)
    }
}

impl<I> Service<Sniffed<I>> for Routes<I> {
    type Response = ();
    type Error = BoxError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, io: Sniffed<I>) -> RouteFuture {
        let protocol = io.protocol();
        if let Some((_, route)) = self.routes.iter().find(|(p, _)| p.contains(protocol)) {
            route(io)
        } else {
            let err = aegis_core::error::reject(SniffError::NotAllowed(protocol));
            Box::pin(std::future::ready(Err(err.into())))
        }
    }
}

/// Detects the protocol of each connection and sends it to the route that serves it;
/// connections with no route are rejected with [`SniffError::NotAllowed`], labelled by
/// their protocol. See the [module docs](super) for an example.
///
/// Routes may be any byte-stream services over [`Sniffed<I>`]; their responses are
/// discarded (the router's response is `()`).
pub struct SniffRouter<I> {
    sniff: Sniff<Routes<I>>,
}

impl<I> Clone for SniffRouter<I> {
    fn clone(&self) -> Self {
        Self {
            sniff: self.sniff.clone(),
        }
    }
}

impl<I> fmt::Debug for SniffRouter<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniffRouter")
            .field("routes", &self.sniff.inner)
            .field("config", &self.sniff.config)
            .finish()
    }
}

impl<I> Default for SniffRouter<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> SniffRouter<I> {
    /// A router with no routes (it rejects everything until routes are added), the
    /// default timeout and prefix size.
    pub fn new() -> Self {
        Self {
            sniff: SniffLayer::new(Protocols::NONE).layer_routes(Routes {
                routes: Arc::new(Vec::new()),
            }),
        }
    }

    /// Sends connections whose protocol is in `protocols` to `service`. Routes are tried
    /// in the order they were added.
    #[must_use]
    pub fn route<S>(mut self, protocols: impl Into<Protocols>, service: S) -> Self
    where
        S: Service<Sniffed<I>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        I: Send + 'static,
    {
        let route = move |io: Sniffed<I>| -> RouteFuture {
            Box::pin(Route::<S, Sniffed<I>, S::Future>::Ready {
                svc: service.clone(),
                io: Some(io),
            })
        };
        Arc::make_mut(&mut self.sniff.inner.routes).push((protocols.into(), Arc::new(route)));
        self.sniff.config.allowed = self.sniff.inner.allowed();
        self
    }

    /// How long detection waits for enough bytes (see [`SniffLayer::timeout`]).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.sniff.config = SniffLayer {
            config: self.sniff.config,
        }
        .timeout(timeout)
        .config;
        self
    }

    /// The most bytes detection reads (see [`SniffLayer::max_prefix`]).
    #[must_use]
    pub fn max_prefix(mut self, bytes: usize) -> Self {
        self.sniff.config = SniffLayer {
            config: self.sniff.config,
        }
        .max_prefix(bytes)
        .config;
        self
    }

    /// The protocols that have a route.
    pub fn routed(&self) -> Protocols {
        self.sniff.config.allowed
    }
}

impl SniffLayer {
    fn layer_routes<I>(self, routes: Routes<I>) -> Sniff<Routes<I>> {
        Sniff::with_config(routes, self.config)
    }
}

impl<I> Service<I> for SniffRouter<I>
where
    I: AsyncRead + Unpin,
{
    type Response = ();
    type Error = BoxError;
    type Future = ResponseFuture<I, Routes<I>, RouteFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::<I>::poll_ready(&mut self.sniff, cx)
    }

    fn call(&mut self, io: I) -> Self::Future {
        self.sniff.call(io)
    }
}

pin_project! {
    /// One routed connection: the route's readiness, then its call.
    ///
    /// A named future rather than an `async` block: the block kept the service clone and
    /// the stream beside the call's future for the life of the connection, 344 bytes
    /// per connection in the mqtt-gateway. Here the service is dropped once called.
    #[project = RouteProj]
    enum Route<S, I, F> {
        Ready { svc: S, io: Option<I> },
        Calling { #[pin] fut: F },
    }
}

impl<S, I> Future for Route<S, I, S::Future>
where
    S: Service<I>,
    S::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                RouteProj::Ready { svc, io } => {
                    std::task::ready!(svc.poll_ready(cx)).map_err(Into::into)?;
                    let io = io.take().expect("Route polled after completion");
                    let fut = svc.call(io);
                    self.set(Route::Calling { fut });
                }
                RouteProj::Calling { fut } => {
                    return fut.poll(cx).map(|res| res.map(drop).map_err(Into::into));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::Detection;
    use aegis_core::Rewind;
    use bytes::Bytes;

    /// A route as large as a deep layer stack, whose future is as large again.
    #[derive(Clone)]
    struct Big([u8; 4096]);

    impl<I> Service<Sniffed<I>> for Big {
        type Response = [u8; 4096];
        type Error = BoxError;
        type Future = std::future::Ready<Result<[u8; 4096], BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Sniffed<I>) -> Self::Future {
            std::future::ready(Ok(self.0))
        }
    }

    #[tokio::test]
    async fn a_routed_connection_does_not_keep_the_route_beside_its_future() {
        let mut router = SniffRouter::new().route(Protocols::MQTT, Big([1; 4096]));
        let io = Sniffed::new(
            Rewind::new(Bytes::new(), tokio::io::empty()),
            Detection::mqtt(4),
        );
        let fut = router.sniff.inner.call(io);
        // The future lives as long as the connection: the larger of the two, not both.
        let size = std::mem::size_of_val(&*fut);
        assert!(size < 2 * 4096, "{size} bytes");
        fut.await.unwrap();
    }
}

//! One log line per gRPC call (target `govflow::requests`, level INFO): the
//! method, the caller, the status code and reason, and the time taken.
//!
//! The caller is known only once the authentication interceptor has run,
//! deep inside the service: this layer, outside it, puts a [`Caller`] slot
//! into the request, and the interceptor fills it in.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

/// Who made a call, as the interceptor found it.
#[derive(Clone, Default)]
pub struct Caller(Arc<OnceLock<String>>);

impl Caller {
    pub fn set(&self, name: &str) {
        let _ = self.0.set(name.to_owned());
    }
}

/// Wraps the server's services with [`RequestLog`].
#[derive(Clone, Copy, Default)]
pub struct RequestLogLayer;

impl<S> tower::Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> RequestLog<S> {
        RequestLog { inner }
    }
}

/// Logs each call once it is answered (a stream: once it is opened).
#[derive(Clone)]
pub struct RequestLog<S> {
    inner: S,
}

type Answer<S, B> = <S as tower::Service<http::Request<B>>>::Response;
type Failure<S, B> = <S as tower::Service<http::Request<B>>>::Error;

impl<S, B, R> tower::Service<http::Request<B>> for RequestLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Answer<S, B>;
    type Error = Failure<S, B>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Answer<S, B>, Failure<S, B>>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // With the call log off (`GOVFLOW_LOG=warn`, or a benchmark) a call
        // costs nothing more than the box.
        if !tracing::enabled!(target: "govflow::requests", tracing::Level::INFO) {
            return Box::pin(self.inner.call(request));
        }
        let method = request.uri().path().to_owned();
        let caller = Caller::default();
        request.extensions_mut().insert(caller.clone());
        let started = Instant::now();
        let answered = self.inner.call(request);
        Box::pin(async move {
            let response = answered.await;
            if let Ok(response) = &response {
                log(&method, &caller, response.headers(), started);
            }
            response
        })
    }
}

fn log(method: &str, caller: &Caller, headers: &http::HeaderMap, started: Instant) {
    // A unary call that succeeds sends its status in trailers, after these
    // headers; any other status comes in them.
    let status = tonic::Status::from_header_map(headers);
    let caller = caller.0.get().map_or("-", String::as_str);
    record("call", method, caller, status.as_ref(), started);
}

/// Logs a stream (a watch) that the server ended with `status`, such as a
/// watcher cut off for reading too slowly: its call was logged when it opened.
pub fn stream_ended(method: &str, caller: &str, status: &tonic::Status, started: Instant) {
    record("stream ended", method, caller, Some(status), started);
}

fn record(
    what: &str,
    method: &str,
    caller: &str,
    status: Option<&tonic::Status>,
    started: Instant,
) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match status {
        Some(status) if status.code() != tonic::Code::Ok => {
            let reason = super::api::reason(status);
            tracing::info!(
                target: "govflow::requests",
                method,
                caller,
                code = ?status.code(),
                reason,
                ms = format_args!("{ms:.1}"),
                detail = status.message(),
                "{what}"
            );
        }
        _ => tracing::info!(
            target: "govflow::requests",
            method,
            caller,
            code = ?tonic::Code::Ok,
            ms = format_args!("{ms:.1}"),
            "{what}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl tracing_subscriber::fmt::MakeWriter<'_> for Captured {
        type Writer = Captured;
        fn make_writer(&self) -> Captured {
            self.clone()
        }
    }

    /// A watcher cut off for reading too slowly was logged nowhere: its
    /// call had been logged as `Ok` when the stream opened.
    #[test]
    fn a_stream_the_server_ends_is_logged_with_its_caller_and_reason() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let status = crate::server::api::status(
                tonic::Code::ResourceExhausted,
                "slow-watcher",
                "cut off",
                &[("cursor", "12".to_owned())],
            );
            stream_ended(
                "/govflow.v1.CasesService/WatchEvents",
                "hebei.sjz.tax",
                &status,
                Instant::now(),
            );
        });
        let text = String::from_utf8_lossy(&captured.0.lock().expect("log")).into_owned();
        assert!(
            text.contains(r#"stream ended method="/govflow.v1.CasesService/WatchEvents" caller="hebei.sjz.tax" code=ResourceExhausted reason="slow-watcher""#),
            "{text}"
        );
    }
}

//! The gRPC floor: a do-nothing `envoy.service.auth.v3.Authorization` server that allows every
//! Check without looking at it. What the best possible ext_authz server costs on this machine.
//!
//! `null-authz [ADDR] [MAX_SECS] [POSTGRES_URL]`: listens on ADDR (default 127.0.0.1:0), prints
//! `listening <addr>` on stdout, and exits by itself after MAX_SECS (default 1800).
//!
//! With POSTGRES_URL it is the **durable floor**: still no authentication, no policy and no token,
//! but every Check is allowed only after a decision row is committed to an audit hash chain
//! (chain `durable-floor`) by aegis' own audit writer, on a current-thread runtime as aegis
//! serves by default. aegis minus everything but its durable audit: the difference to aegis is
//! what identity costs, the difference to the plain floor what durable audit costs. A Check whose
//! row could not be committed is denied (PERMISSION_DENIED), as aegis does.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis::audit::{AuditChain, WriterOptions};
use aegis::pg::PgTarget;
use aegis::secret::Key32;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

struct Null {
    /// The durable floor's chain; None for the plain floor.
    audit: Option<Arc<AuditChain>>,
    next: AtomicU64,
}

fn allowed() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Null {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let Some(audit) = &self.audit else {
            return Ok(Response::new(allowed()));
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match audit.append(bench::sample_draft(n)).await {
            Ok(_) => Ok(Response::new(allowed())),
            Err(_) => Ok(Response::new(CheckResponse {
                status: Some(rpc::Status {
                    code: tonic::Code::PermissionDenied as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_string());
    let max_secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let pg = args.next();
    // The plain floor on tokio's default multi-thread runtime (as always); the durable floor on a
    // current-thread runtime, like aegis with its default `server.worker_threads = 1`.
    let runtime = match pg {
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        Some(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(rt) => rt.block_on(serve(addr, max_secs, pg)),
        Err(e) => {
            eprintln!("null-authz: cannot start a runtime: {e}");
            std::process::exit(2);
        }
    }
}

async fn serve(addr: String, max_secs: u64, pg: Option<String>) {
    let audit = match pg {
        None => None,
        Some(url) => {
            let target = match PgTarget::parse(&url) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("null-authz: bad PostgreSQL url: {e}");
                    std::process::exit(2);
                }
            };
            let chain = AuditChain::start(
                target,
                "durable-floor".into(),
                "k1".into(),
                Key32::generate(),
                "durable-floor".into(),
                WriterOptions::default(),
            );
            let started = Instant::now();
            while !chain.head_loaded() {
                if started.elapsed() > Duration::from_secs(30) {
                    eprintln!("null-authz: the audit chain head did not load within 30s");
                    std::process::exit(2);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(chain)
        }
    };
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("null-authz: cannot bind {addr}: {e}");
            std::process::exit(2);
        }
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    let incoming = tokio_stream_shim(listener);
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(AuthorizationServer::new(Null {
            audit,
            next: AtomicU64::new(0),
        }))
        .serve_with_incoming(incoming);
    tokio::select! {
        r = serve => if let Err(e) = r { eprintln!("null-authz: {e}"); },
        _ = tokio::time::sleep(Duration::from_secs(max_secs)) => {}
    }
}

/// The accepted connections of `listener`, with Nagle off, as tonic's incoming stream.
fn tokio_stream_shim(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

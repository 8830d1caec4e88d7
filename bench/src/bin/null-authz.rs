//! The gRPC floor: a do-nothing `envoy.service.auth.v3.Authorization` server that allows every
//! Check without looking at it. What the best possible ext_authz server costs on this machine.
//!
//! `null-authz [ADDR] [MAX_SECS]`: listens on ADDR (default 127.0.0.1:0), prints
//! `listening <addr>` on stdout, and exits by itself after MAX_SECS (default 1800).

use std::io::Write;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

struct Null;

#[tonic::async_trait]
impl Authorization for Null {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_string());
    let max_secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1800);
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
        .add_service(AuthorizationServer::new(Null))
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

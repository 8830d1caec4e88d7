//! The gRPC listener hands out users' Databricks tokens, so plaintext on a non-loopback address
//! is refused by `aegis config check` unless the operator opts out explicitly, and aegis can
//! serve mTLS: Envoy with its client certificate gets through, anything else is refused at the
//! handshake.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ME: &str = "/api/2.0/preview/scim/v2/Me";
const AUTHZ: &str = "envoy.service.auth.v3.Authorization";

/// A CA, a server certificate for aegis (`aegis.test`, 127.0.0.1), a client certificate for
/// Envoy from the same CA, and a client certificate from another CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        let new_ca = |cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), rcgen::Issuer::new(params, key))
        };
        let leaf = |names: Vec<String>, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, ca) = new_ca("aegis test CA");
        let (_, rogue) = new_ca("another CA");
        let files = [
            ("ca.crt", ca_pem.clone(), None),
            (
                "server",
                String::new(),
                Some(leaf(vec!["aegis.test".into(), "127.0.0.1".into()], &ca)),
            ),
            (
                "envoy",
                String::new(),
                Some(leaf(vec!["envoy".into()], &ca)),
            ),
            (
                "rogue",
                String::new(),
                Some(leaf(vec!["envoy".into()], &rogue)),
            ),
        ];
        for (name, pem, pair) in files {
            match pair {
                None => std::fs::write(dir.join(name), pem).unwrap(),
                Some((cert, key)) => {
                    std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
                    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
                }
            }
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }
}

/// `envoy/dev.yaml` with Envoy talking to aegis over mTLS.
fn mtls_envoy(pki: &Pki) -> String {
    let anchor = "    - name: aegis\n      type: STATIC\n";
    let template = dev_envoy_yaml().expect("envoy/dev.yaml");
    assert!(
        template.contains(anchor),
        "the aegis cluster moved in dev.yaml"
    );
    template.replace(
        anchor,
        &format!(
            "{anchor}      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: aegis.test
          common_tls_context:
            alpn_protocols: [\"h2\"]
            tls_certificates:
              - certificate_chain: {{ filename: {cert} }}
                private_key: {{ filename: {key} }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: aegis.test }}
",
            cert = pki.path("envoy.crt"),
            key = pki.path("envoy.key"),
            ca = pki.path("ca.crt"),
        ),
    )
}

/// A gRPC health check against aegis over TLS, as a client with `identity` (or none).
async fn health_over_tls(grpc: &str, pki: &Pki, identity: Option<&str>) -> Result<i32, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.crt")))
        .domain_name("aegis.test");
    if let Some(name) = identity {
        tls = tls.identity(Identity::from_pem(
            pki.read(&format!("{name}.crt")),
            pki.read(&format!("{name}.key")),
        ));
    }
    let channel = Channel::from_shared(format!("https://{grpc}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: AUTHZ.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| format!("call: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_aegis_over_mtls_and_a_client_without_the_ca_does_not() {
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::make(certs.path());
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let opts = StackOptions::new(AEGIS_BIN)
        .with_envoy_template(mtls_envoy(&pki))
        .with_config(move |c| {
            let server = c
                .get_mut("server")
                .and_then(|v| v.as_table_mut())
                .expect("server");
            server.insert("grpc_tls_cert_file".into(), cert.into());
            server.insert("grpc_tls_key_file".into(), key.into());
            server.insert("grpc_client_ca_file".into(), ca.into());
        });
    let stack = start_with(opts).await;
    let alice = token(&stack, "alice");

    // Envoy, with its client certificate: the request goes through as alice.
    let r = get(&stack, ME, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["userName"], "alice@example.com");

    let grpc = stack.aegis.grpc_listen().to_string();
    // The same CA's client certificate: served (positive control for the checks below).
    assert_eq!(health_over_tls(&grpc, &pki, Some("envoy")).await, Ok(1));
    // No client certificate, or one from another CA: refused at the handshake.
    for who in [None, Some("rogue")] {
        let got = health_over_tls(&grpc, &pki, who).await;
        assert!(got.is_err(), "{who:?} was served: {got:?}");
    }
    // Plaintext h2 to the TLS port: refused too.
    let plain = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    let plain_served = match plain {
        Ok(ch) => HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: AUTHZ.into(),
            })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!plain_served, "a plaintext client was served");
    stack.shutdown().await;
}

#[tokio::test]
async fn plaintext_grpc_on_a_public_address_is_refused_by_config_check() {
    let stack = start().await;
    let check = |name: &str, edit: &dyn Fn(&mut toml::Table)| {
        let mut cfg = stack.config().clone();
        edit(
            cfg.get_mut("server")
                .and_then(|v| v.as_table_mut())
                .expect("server"),
        );
        let path = stack.write_config_as(name, &cfg).expect("config written");
        aegis(&["config", "check", "--config", path.to_str().unwrap()])
    };
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::make(certs.path());

    // Positive control: the stack's own loopback listener passes.
    let (code, out, err) = check("loopback.toml", &|_| {});
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("plaintext"), "{err}");

    let (code, _, err) = check("public.toml", &|s| {
        s.insert("grpc_listen".into(), "0.0.0.0:9191".into());
    });
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("server.grpc_listen") && err.contains("plaintext gRPC on 0.0.0.0:9191"),
        "{err}"
    );

    // The explicit opt-out passes, loudly.
    let (code, out, err) = check("opt-out.toml", &|s| {
        s.insert("grpc_listen".into(), "0.0.0.0:9191".into());
        s.insert("grpc_allow_plaintext".into(), true.into());
    });
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("warning: server.grpc_listen"), "{err}");

    // mTLS passes; half of it is an error naming what is missing; a key file without a key is
    // an error naming the file.
    let tls = |s: &mut toml::Table, key: &str| {
        s.insert("grpc_listen".into(), "0.0.0.0:9191".into());
        s.insert("grpc_tls_cert_file".into(), pki.path("server.crt").into());
        s.insert("grpc_tls_key_file".into(), pki.path(key).into());
        s.insert("grpc_client_ca_file".into(), pki.path("ca.crt").into());
    };
    let (code, out, err) = check("mtls.toml", &|s| tls(s, "server.key"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("warning"), "{err}");
    let (code, _, err) = check("half.toml", &|s| {
        tls(s, "server.key");
        s.remove("grpc_client_ca_file");
    });
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("server.grpc_client_ca_file"), "{err}");
    let (code, _, err) = check("bad-key.toml", &|s| tls(s, "server.crt"));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("server.grpc_tls_key_file") && err.contains("holds no PEM private key"),
        "{err}"
    );
    stack.shutdown().await;
}

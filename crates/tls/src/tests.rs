use std::sync::Arc;

use super::*;

/// Runs a TLS handshake between the two configurations in memory.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    name: &str,
) -> Result<(), rustls::Error> {
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(client, name)?;
    let mut s = rustls::ServerConnection::new(server)?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            assert!(s.peer_certificates().is_some(), "no client certificate");
            return Ok(());
        }
    }
    panic!("the handshake did not finish")
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, an edge certificate for `10.0.0.2` and a gateway client
    /// certificate, written under one folder.
    fn issue(&self, ca_name: &str) {
        let ca = Authority::generate(ca_name).unwrap();
        ca.write_cert(&self.path("ca.crt")).unwrap();
        ca.issue_server(&["10.0.0.2".into(), "edge.eu-1".into()])
            .unwrap()
            .write(self.dir.path(), "edge")
            .unwrap();
        ca.issue_client("gateway")
            .unwrap()
            .write(self.dir.path(), "gateway")
            .unwrap();
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> Arc<Reloading<rustls::ServerConfig>> {
        server_config(
            &self.path("edge.crt"),
            &self.path("edge.key"),
            Some(&self.path("ca.crt")),
        )
        .unwrap()
    }

    fn client(&self) -> Arc<Reloading<rustls::ClientConfig>> {
        client_config(
            &self.path("ca.crt"),
            &self.path("gateway.crt"),
            &self.path("gateway.key"),
        )
        .unwrap()
    }
}

fn pki(ca_name: &str) -> Pki {
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    pki.issue(ca_name);
    pki
}

#[test]
fn an_edge_and_a_gateway_with_certificates_of_one_ca_complete_mutual_tls() {
    let pki = pki("fleet CA");
    handshake(pki.client().current(), pki.server().current(), "10.0.0.2").unwrap();
    handshake(pki.client().current(), pki.server().current(), "edge.eu-1").unwrap();
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_and_so_is_a_wrong_server_name() {
    let ours = pki("fleet CA");
    let theirs = pki("someone else's CA");
    let refused = handshake(
        theirs.client().current(),
        ours.server().current(),
        "10.0.0.2",
    );
    assert!(refused.is_err(), "a foreign client was accepted");
    let wrong_name = handshake(ours.client().current(), ours.server().current(), "10.0.0.9");
    assert!(
        wrong_name.is_err(),
        "a certificate for another name was accepted"
    );
}

#[test]
fn rotated_files_are_used_without_a_restart_and_a_broken_rotation_keeps_the_last_good_ones() {
    let pki = pki("first CA");
    let server = pki.server();
    let old_client = pki.client().current();
    assert!(!server.refresh().unwrap(), "nothing changed yet");

    pki.issue("second CA");
    assert!(server.refresh().unwrap());
    assert!(
        handshake(old_client, server.current(), "10.0.0.2").is_err(),
        "a client of the retired CA still got in"
    );
    handshake(pki.client().current(), server.current(), "10.0.0.2").unwrap();

    std::fs::write(pki.path("edge.crt"), "half a certificate").unwrap();
    let e = server.refresh().unwrap_err();
    assert!(e.to_string().contains("edge.crt"), "{e}");
    handshake(pki.client().current(), server.current(), "10.0.0.2").unwrap();
}

#[test]
fn unreadable_or_wrong_files_are_named_in_the_error() {
    let pki = pki("fleet CA");
    let missing = server_config(&pki.path("nope.crt"), &pki.path("edge.key"), None).unwrap_err();
    assert!(missing.to_string().contains("nope.crt"), "{missing}");
    let swapped = server_config(&pki.path("edge.key"), &pki.path("edge.crt"), None).unwrap_err();
    assert!(swapped.to_string().contains("edge.key"), "{swapped}");
}

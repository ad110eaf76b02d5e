//! A throw-away certificate authority with one server and one client
//! certificate, for tests and single-host installs. A production fleet
//! uses certificates from its own CA (cert-manager, a corporate PKI).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::AuthError;

/// PEM text of every file.
#[derive(Clone)]
pub struct DevTls {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl std::fmt::Debug for DevTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevTls").finish_non_exhaustive()
    }
}

fn failed(e: rcgen::Error) -> AuthError {
    AuthError::Tls(e)
}

/// A CA, a server certificate valid for `server_names` (DNS names or IP
/// addresses) and a client certificate named `client_name`.
pub fn dev_tls(server_names: &[String], client_name: &str) -> Result<DevTls, AuthError> {
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Flotilla development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(names).map_err(failed)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(failed)?;
        Ok::<_, AuthError>((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        server_names.to_vec(),
        server_names.first().map_or("nats", String::as_str),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        vec![client_name.to_string()],
        client_name,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(DevTls {
        ca_cert: ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_files() {
        let t = dev_tls(&["localhost".into(), "127.0.0.1".into()], "flotilla").unwrap();
        assert!(t.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(t.server_key.contains("PRIVATE KEY"));
        assert_ne!(t.server_cert, t.client_cert);
    }
}

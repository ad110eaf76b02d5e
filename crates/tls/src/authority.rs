//! A certificate authority that issues edge (server) and gateway (client)
//! certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::TlsError;

/// A CA kept in memory: its certificate to hand out, its key to sign with.
pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (the key readable
    /// by its owner only) and returns their paths. Each file is written
    /// whole to a temporary name and renamed, so a reader never sees half
    /// of a rotated certificate.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        write_whole(&cert, self.cert_pem.as_bytes(), false)?;
        write_whole(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }
}

fn write_whole(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    let failed = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(failed)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
            .map_err(failed)?;
    }
    std::fs::rename(&partial, path).map_err(failed)
}

impl Authority {
    /// A new CA named `name`.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM: what each side trusts.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) -> Result<(), TlsError> {
        write_whole(path, self.cert_pem().as_bytes(), false)
    }

    /// A server certificate valid for `names` (DNS names or IP addresses;
    /// the first is also its common name).
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, TlsError> {
        self.issue(
            names.to_vec(),
            names.first().map_or("edge", String::as_str),
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `name`.
    pub fn issue_client(&self, name: &str) -> Result<Issued, TlsError> {
        self.issue(
            vec![name.to_string()],
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::new(names).map_err(TlsError::Generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(TlsError::Generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

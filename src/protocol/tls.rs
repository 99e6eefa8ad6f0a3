//! TLS identity of the ext_proc server: on by default with a certificate generated at start,
//! as the reference (gateways are configured to skip verification), or `tls.crt`/`tls.key`
//! from `--cert-path`.

use std::path::{Path, PathBuf};

use tonic::transport::Identity;

/// Why no TLS identity could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM.
    #[error("{path} is not a PEM file")]
    NotPem {
        /// File path.
        path: PathBuf,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn read_pem(path: PathBuf) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(&path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem { path });
    }
    Ok(bytes)
}

/// `tls.crt` and `tls.key` from `dir`.
pub fn load_identity(dir: &Path) -> Result<Identity, TlsError> {
    let cert = read_pem(dir.join("tls.crt"))?;
    let key = read_pem(dir.join("tls.key"))?;
    Ok(Identity::from_pem(cert, key))
}

/// A fresh self-signed certificate (ECDSA P-256, valid for the process's life and beyond).
pub fn self_signed_identity() -> Result<(Identity, String), TlsError> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "endpoint-picker".to_owned()])?;
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    Ok((
        Identity::from_pem(cert_pem.as_bytes(), key_pem.as_bytes()),
        cert_pem,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_and_loaded() {
        let (_, pem) = self_signed_identity().unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = std::env::temp_dir().join(format!("epp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(load_identity(&dir), Err(TlsError::Read { .. })));
        std::fs::write(dir.join("tls.crt"), "not pem").unwrap();
        std::fs::write(dir.join("tls.key"), "not pem").unwrap();
        assert!(matches!(load_identity(&dir), Err(TlsError::NotPem { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

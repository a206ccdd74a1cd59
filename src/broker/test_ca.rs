//! A private CA for tests, as cert-manager or a chart makes one: a CA certificate, and server
//! certificates it signs. The integration tests' harness (`tests/common`) uses this same file.

use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub(crate) struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub(crate) fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsgate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("a CA certificate");
        TestCa { cert, key }
    }

    /// The CA certificate as a `--redis-ca-file` holds it.
    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `name` (a host name or an IP address) that this CA signed, and
    /// its key.
    pub(crate) fn issue(&self, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = self.signed(name);
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        (cert.der().clone(), key.into())
    }

    /// The same as PEM files hold them (a server's `--tls-cert-file` and `--tls-key-file`).
    #[allow(
        dead_code,
        reason = "for the integration tests' redis-server, not the unit tests"
    )]
    pub(crate) fn issue_pem(&self, name: &str) -> (String, String) {
        let (cert, key) = self.signed(name);
        (cert.pem(), key.serialize_pem())
    }

    fn signed(&self, name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("a server key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("server params")
            .signed_by(&key, &self.cert, &self.key)
            .expect("a server certificate");
        (cert, key)
    }
}

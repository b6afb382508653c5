//! `[upstreams.NAME]`: the backends, their timeouts and the headers added to
//! what they receive.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use toml::Spanned;

use super::Validator;
use crate::policy::raw::RawUpstream;
use crate::policy::{Upstream, UpstreamTls};

const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_READ_TIMEOUT_MS: u64 = 300_000;
impl Validator<'_> {
    pub(super) fn upstreams(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawUpstream>>,
    ) -> Vec<Upstream> {
        let mut out = Vec::new();
        for (name, upstream) in raw {
            let upstream = upstream.get_ref();
            let (url, placeholder) = self.expand_with_placeholders(&upstream.url);
            let parsed = match parse_upstream_url(&url) {
                Ok(parsed) => Some(parsed),
                // `check --no-env`: the real URL is unknown; only its scheme is read.
                Err(_) if placeholder => Some((
                    super::PLACEHOLDER.to_string(),
                    443,
                    url.starts_with("https://"),
                )),
                Err(e) => {
                    self.error(upstream.url.span(), e);
                    None
                }
            };
            let Some((host, port, https)) = parsed else {
                continue;
            };
            let tls = self.upstream_tls(upstream, &host, https);
            let mut set_headers = Vec::new();
            for (header, value) in &upstream.set_headers {
                let value_text = self.expand(value);
                match (
                    HeaderName::try_from(header.as_str()),
                    HeaderValue::try_from(value_text),
                ) {
                    (Ok(h), Ok(v)) => set_headers.push((h, v)),
                    (Err(_), _) => self.error(
                        value.span(),
                        format!("{header:?} is not a valid header name"),
                    ),
                    (_, Err(_)) => self.error(
                        value.span(),
                        format!("the value of {header} is not a valid header value"),
                    ),
                }
            }
            out.push(Upstream {
                name: name.clone(),
                host,
                port,
                tls,
                connect_timeout_ms: self.duration_ms(
                    &upstream.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT_MS,
                    "connect_timeout",
                ),
                read_timeout_ms: self.duration_ms(
                    &upstream.read_timeout,
                    DEFAULT_READ_TIMEOUT_MS,
                    "read_timeout",
                ),
                set_headers,
            });
        }
        out
    }
}

impl Validator<'_> {
    /// The TLS settings of an upstream: `Some` exactly for an `https://` URL. SNI
    /// and the name checked on the certificate are the URL's host unless
    /// `tls.server_name` says otherwise; `tls.ca_file` (PEM, relative to the policy
    /// file) replaces the system's CAs for this upstream.
    fn upstream_tls(
        &mut self,
        upstream: &RawUpstream,
        host: &str,
        https: bool,
    ) -> Option<UpstreamTls> {
        let raw = upstream.tls.as_ref();
        if !https {
            if let Some(raw) = raw {
                self.error(raw.span(), "tls applies only to an https:// url");
            }
            return None;
        }
        let raw = raw.map(Spanned::get_ref);
        let server_name = match raw.and_then(|t| t.server_name.as_ref()) {
            Some(name) => {
                let (text, placeholder) = self.expand_with_placeholders(name);
                if !placeholder && (text.is_empty() || text.contains(['/', ':', ' '])) {
                    self.error(
                        name.span(),
                        format!("server_name {text:?} is not a host name"),
                    );
                }
                text
            }
            None => host.to_string(),
        };
        let ca_der = match raw.and_then(|t| t.ca_file.as_ref()) {
            Some(file) => {
                let (path, placeholder) = self.expand_with_placeholders(file);
                if placeholder {
                    Vec::new()
                } else {
                    let path = match std::path::Path::new(self.file).parent() {
                        Some(dir) => dir.join(&path),
                        None => std::path::PathBuf::from(&path),
                    };
                    read_ca_file(&path).unwrap_or_else(|e| {
                        self.error(file.span(), format!("ca_file {}: {e}", path.display()));
                        Vec::new()
                    })
                }
            }
            None => Vec::new(),
        };
        Some(UpstreamTls {
            server_name,
            ca_der,
            verify: raw.and_then(|t| t.verify).unwrap_or(true),
        })
    }
}

/// The certificates of a PEM file, as DER, each checked to parse as X.509: at
/// least one, and nothing but certificates.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut certificates = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(&text) {
        let pem = pem.map_err(|e| format!("is not PEM: {e}"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!("holds a {}, not only certificates", pem.label));
        }
        pem.parse_x509()
            .map_err(|e| format!("holds a certificate that does not parse: {e}"))?;
        certificates.push(pem.contents);
    }
    if certificates.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certificates)
}

/// `http(s)://host:port` → (host, port, https). Paths are not allowed: the
/// request's own path is forwarded as it came.
fn parse_upstream_url(url: &str) -> Result<(String, u16, bool), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{url:?}: an upstream URL has no path; requests keep their own"
        ));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        port,
        tls,
    ))
}

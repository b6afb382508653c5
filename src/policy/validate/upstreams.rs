//! `[upstreams.NAME]`: the backends, their timeouts and the headers added to
//! what they receive.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use toml::Spanned;

use super::Validator;
use crate::policy::raw::RawUpstream;
use crate::policy::Upstream;

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
            let url = self.expand(&upstream.url);
            let Some((host, port, tls)) = parse_upstream_url(&url)
                .map_err(|e| self.error(upstream.url.span(), e))
                .ok()
            else {
                continue;
            };
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

/// `http://host:port` → (host, port, tls). Paths are not allowed: the request's
/// own path is forwarded as it came.
fn parse_upstream_url(url: &str) -> Result<(String, u16, bool), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => {
            return Err(format!("{url:?}: https upstreams are not supported yet (this build has no TLS); put a TLS-terminating sidecar in front, or use http"))
        }
        _ => return Err(format!("{url:?} must start with http://")),
    };
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{url:?}: an upstream URL has no path; requests keep their own"
        ));
    }
    let port = uri.port_u16().unwrap_or(80);
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        port,
        tls,
    ))
}

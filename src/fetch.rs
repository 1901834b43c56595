//! Fetching images from URLs sent by strangers, hardened against server-side request forgery.
//!
//! What a caller gets from [`Fetcher::fetch`]:
//!
//! * only `http` and `https` URLs are fetched, parsed with the WHATWG rules of the `url`
//!   crate, so every odd spelling of an address (`http://2130706433/`, `0177.0.0.1`,
//!   `0x7f.1`, `127.1`, `good.com@127.0.0.1`, bracketed IPv6, ...) is seen as the address
//!   it really is;
//! * unless [`FetchSettings::allow_private_hosts`] is set, no connection is ever opened to a
//!   loopback, private, link-local, shared, multicast, reserved or otherwise special
//!   address ([`is_forbidden_ip`]). IP-literal hosts are checked before the request and on
//!   every redirect hop; host names are resolved by [`GuardedResolver`], which hands the
//!   HTTP client only addresses that passed the check, so the connection goes to exactly
//!   the address that was checked (no DNS rebinding window);
//! * environment proxies are ignored, redirects are limited and checked hop by hop;
//! * the body is capped at [`FetchSettings::max_bytes`] (early from `Content-Length`, and
//!   while streaming), and the whole exchange, body included, is bounded by
//!   [`FetchSettings::total_timeout`].
//!
//! Errors are [`FetchError`]s whose `Display` texts are written for the person who sent
//! the URL.

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;
use url::{Host, Url};

/// The `User-Agent` sent with every request.
pub const USER_AGENT: &str = concat!("search-img/", env!("CARGO_PKG_VERSION"));

/// URLs longer than this are refused outright as [`FetchError::InvalidUrl`].
pub const MAX_URL_LEN: usize = 8 * 1024;

/// Never pre-allocate more than this from an upstream `Content-Length`: the header is a
/// promise, not bytes in hand.
const MAX_PREALLOC: usize = 1024 * 1024;

pub use crate::config::FetchSettings;

/// Why a fetch failed. The `Display` texts are meant for the sender of the URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The URL could not be parsed, has no host, or is otherwise unusable.
    #[error("invalid image URL: {0}")]
    InvalidUrl(String),
    /// The URL's scheme is not `http` or `https` (the payload is the scheme).
    #[error("unsupported image URL scheme \"{0}\"; only http and https URLs can be fetched")]
    UnsupportedScheme(String),
    /// The host is, or resolves to, an address that must not be contacted. The payload
    /// (the host and its addresses) is for the log only: naming them to the client would
    /// map internal names for an attacker.
    #[error("image URL host resolves to a private or reserved address; refusing to fetch it")]
    ForbiddenHost(String),
    /// The fetch did not finish in time.
    #[error("{CANNOT_FETCH}")]
    Timeout,
    /// The body is larger than the configured limit.
    #[error("the image at the URL is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The server answered with a non-success status (the payload is for the log).
    #[error("{CANNOT_FETCH}")]
    HttpStatus(u16),
    /// The redirect chain is longer than allowed.
    #[error("the image URL redirected too many times")]
    TooManyRedirects,
    /// Name resolution, connection, TLS or transfer failed (the payload is for the log).
    #[error("{CANNOT_FETCH}")]
    Network(String),
    /// The HTTP client could not be built (an internal problem, not the sender's).
    #[error("internal error setting up the image fetcher: {0}")]
    Client(String),
}

/// What a client is told for every failure to get an answer from the image's host:
/// telling refused, timed out and an HTTP status apart would let it probe other hosts'
/// ports through this service. The cause is logged.
const CANNOT_FETCH: &str = "could not fetch the image URL (no image came back from its host)";

impl FetchError {
    /// Whether the failure is down to the URL (or what it points at) rather than to this
    /// service: everything except [`FetchError::Client`].
    pub fn is_client_fault(&self) -> bool {
        !matches!(self, FetchError::Client(_))
    }
}

/// A [`FetchError`] carried through reqwest's error chain (from the resolver or the
/// redirect policy) so that [`Fetcher::fetch`] can surface it unchanged.
#[derive(Debug)]
struct Carried(FetchError);

impl fmt::Display for Carried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for Carried {}

/// Whether `ip` must not be contacted on behalf of a stranger: anything that is not a
/// plain globally routable unicast address.
///
/// IPv4: 0.0.0.0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.0.0.0/24,
/// 192.0.2.0/24, 192.88.99.0/24, 192.168/16, 198.18/15, 198.51.100/24, 203.0.113/24,
/// 224/4, 240/4 (incl. 255.255.255.255).
///
/// IPv6: everything outside global unicast 2000::/3, except IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`) and NAT64 (`64:ff9b::/96`)
/// addresses, which are judged by their embedded IPv4 address; the whole of `::/96`
/// (unspecified, loopback, deprecated IPv4-compatible) and the local-use NAT64 prefix
/// `64:ff9b:1::/48`. Inside 2000::/3: 2001::/23 (IETF assignments incl. Teredo
/// 2001::/32 and benchmarking 2001:2::/48), 2001:db8::/32 and 3fff::/20 (documentation),
/// and 6to4 2002::/16 when its embedded IPv4 address is forbidden.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    match a {
        0 => true,                             // "this network", incl. 0.0.0.0
        10 => true,                            // private
        100 if (64..128).contains(&b) => true, // carrier-grade NAT 100.64/10
        127 => true,                           // loopback
        169 if b == 254 => true,               // link-local, cloud metadata
        172 if (16..32).contains(&b) => true,  // private 172.16/12
        192 if b == 0 && c == 0 => true,       // IETF protocol assignments
        192 if b == 0 && c == 2 => true,       // TEST-NET-1
        192 if b == 88 && c == 99 => true,     // 6to4 relay anycast (deprecated)
        192 if b == 168 => true,               // private
        198 if b == 18 || b == 19 => true,     // benchmarking 198.18/15
        198 if b == 51 && c == 100 => true,    // TEST-NET-2
        203 if b == 0 && c == 113 => true,     // TEST-NET-3
        224..=255 => true,                     // multicast, reserved, broadcast
        _ => false,
    }
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped ::ffff:a.b.c.d: a dual-stack socket sends it to a.b.c.d.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    // ::/96: unspecified, loopback and the deprecated IPv4-compatible ::a.b.c.d.
    if s[..6] == [0; 6] {
        return true;
    }
    // IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return is_forbidden_v4(embedded_v4(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96 reaches the embedded IPv4 address.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return is_forbidden_v4(embedded_v4(s[6], s[7]));
    }
    // 6to4 2002:aabb:ccdd::/48 reaches a.b.c.d.
    if s[0] == 0x2002 {
        return is_forbidden_v4(embedded_v4(s[1], s[2]));
    }
    // Everything else outside global unicast 2000::/3: unique-local fc00::/7, link-local
    // fe80::/10, site-local fec0::/10, multicast ff00::/8, discard 100::/64, local-use
    // NAT64 64:ff9b:1::/48, ...
    if s[0] & 0xe000 != 0x2000 {
        return true;
    }
    // IETF protocol assignments 2001::/23 (Teredo, benchmarking, ORCHID, ...).
    if s[0] == 0x2001 && s[1] < 0x0200 {
        return true;
    }
    // Documentation 2001:db8::/32 and 3fff::/20.
    if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000) {
        return true;
    }
    false
}

/// Parses an image URL the way browsers do, refusing over-long and host-less URLs.
/// Does not check the scheme or host; see [`check_url`].
pub fn parse_url(raw: &str) -> Result<Url, FetchError> {
    if raw.len() > MAX_URL_LEN {
        return Err(FetchError::InvalidUrl(format!(
            "the URL is longer than {MAX_URL_LEN} bytes"
        )));
    }
    Url::parse(raw).map_err(|e| FetchError::InvalidUrl(format!("{e}")))
}

/// Checks a URL (the first one, or a redirect target) before anything is sent to it:
/// the scheme must be http or https, there must be a host, an IP-literal host must not
/// be forbidden (unless `allow_private_hosts`), and there must be no credentials in it.
///
/// Host names pass here; they are checked against the addresses they resolve to when
/// the connection is made (see [`GuardedResolver`]).
pub fn check_url(url: &Url, allow_private_hosts: bool) -> Result<(), FetchError> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(FetchError::UnsupportedScheme(other.to_owned())),
    }
    let host = url
        .host()
        .ok_or_else(|| FetchError::InvalidUrl("the URL has no host".to_owned()))?;
    if !allow_private_hosts {
        let ip = match host {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(_) => None,
        };
        if let Some(ip) = ip {
            if is_forbidden_ip(ip) {
                return Err(FetchError::ForbiddenHost(ip.to_string()));
            }
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchError::InvalidUrl(
            "the URL must not contain a user name or password".to_owned(),
        ));
    }
    Ok(())
}

/// The decision taken for one redirect hop: `previous_len` is the number of URLs already
/// requested (the first URL included), `next` the redirect target.
pub fn check_redirect(
    next: &Url,
    previous_len: usize,
    max_redirects: usize,
    allow_private_hosts: bool,
) -> Result<(), FetchError> {
    if previous_len > max_redirects {
        return Err(FetchError::TooManyRedirects);
    }
    check_url(next, allow_private_hosts)
}

/// Whether a host name belongs to the `localhost` family (RFC 6761), with or without a
/// trailing dot. Such names are answered with loopback addresses without asking DNS.
fn is_localhost_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Resolves `host` and returns only the addresses that may be contacted.
///
/// Numeric hosts are read with the URL parser's rules (so `2130706433` is 127.0.0.1)
/// rather than left to the system resolver; `localhost` names map to loopback. Fails
/// with [`FetchError::ForbiddenHost`] when addresses were found but all are forbidden.
pub async fn resolve_host(
    host: &str,
    allow_private_hosts: bool,
) -> Result<Vec<SocketAddr>, FetchError> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let found: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, 0)]
    } else if let Ok(Host::Ipv4(v4)) = Host::parse(host) {
        vec![SocketAddr::new(IpAddr::V4(v4), 0)]
    } else if is_localhost_name(host) {
        vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        ]
    } else {
        tokio::net::lookup_host((host, 0u16))
            .await
            .map_err(|e| FetchError::Network(format!("could not resolve host {host}: {e}")))?
            .collect()
    };
    if found.is_empty() {
        return Err(FetchError::Network(format!("host {host} has no addresses")));
    }
    if allow_private_hosts {
        return Ok(found);
    }
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        found.into_iter().partition(|a| !is_forbidden_ip(a.ip()));
    if !refused.is_empty() {
        tracing::warn!(
            host,
            refused = ?refused.iter().map(|a| a.ip()).collect::<Vec<_>>(),
            allowed = allowed.len(),
            "image host resolved to forbidden addresses"
        );
    }
    if allowed.is_empty() {
        let ips = refused
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(FetchError::ForbiddenHost(format!("{host} -> {ips}")));
    }
    Ok(allowed)
}

/// The DNS resolver installed in the fetcher's HTTP client: resolves with the system
/// resolver (see [`resolve_host`]) and drops forbidden addresses, so the client can only
/// connect to checked addresses.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    allow_private_hosts: bool,
}

impl GuardedResolver {
    /// A resolver that drops forbidden addresses unless `allow_private_hosts`.
    pub fn new(allow_private_hosts: bool) -> Self {
        Self {
            allow_private_hosts,
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow = self.allow_private_hosts;
        Box::pin(async move {
            match resolve_host(&host, allow).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                Err(e) => Err(Box::new(Carried(e)) as Box<dyn StdError + Send + Sync>),
            }
        })
    }
}

/// Fetches image bytes from URLs; cheap to clone (one shared HTTP client).
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    cfg: Arc<FetchSettings>,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher").field("cfg", &self.cfg).finish()
    }
}

impl Fetcher {
    /// Builds the HTTP client for `cfg`.
    pub fn new(cfg: FetchSettings) -> Result<Self, FetchError> {
        let allow = cfg.allow_private_hosts;
        let max_redirects = cfg.max_redirects;
        let policy = redirect::Policy::custom(move |attempt| {
            match check_redirect(
                attempt.url(),
                attempt.previous().len(),
                max_redirects,
                allow,
            ) {
                Ok(()) => attempt.follow(),
                Err(e) => {
                    tracing::debug!(target_url = %attempt.url(), error = %e, "redirect refused");
                    attempt.error(Carried(e))
                }
            }
        });
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static("image/*,*/*;q=0.8"),
        );
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(allow)))
            .redirect(policy)
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.total_timeout)
            .referer(false)
            .build()
            .map_err(|e| FetchError::Client(error_chain(&e)))?;
        Ok(Self {
            client,
            cfg: Arc::new(cfg),
        })
    }

    /// The configuration this fetcher was built with.
    pub fn config(&self) -> &FetchSettings {
        &self.cfg
    }

    /// Fetches `url` and returns its body, enforcing every check of this module.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        let url = parse_url(url)?;
        check_url(&url, self.cfg.allow_private_hosts)?;
        let result =
            match tokio::time::timeout(self.cfg.total_timeout, self.fetch_checked(url)).await {
                Ok(result) => result,
                Err(_elapsed) => Err(FetchError::Timeout),
            };
        if let Err(e) = &result {
            // The cause the client is not told (see CANNOT_FETCH, ForbiddenHost).
            tracing::info!(cause = ?e, "image fetch failed");
        }
        result
    }

    async fn fetch_checked(&self, url: Url) -> Result<Bytes, FetchError> {
        let limit = self.cfg.max_bytes;
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(map_reqwest_error)?;
        let status = resp.status();
        if status.is_redirection() {
            // A redirect the client did not follow because its target could not be turned
            // into a request (e.g. `file:///etc/passwd`): say why when the target is refused.
            if let Some(target) = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|loc| resp.url().join(loc).ok())
            {
                check_url(&target, self.cfg.allow_private_hosts)?;
            }
        }
        if !status.is_success() {
            return Err(FetchError::HttpStatus(status.as_u16()));
        }
        let declared = resp.content_length();
        if let Some(len) = declared {
            if len > limit as u64 {
                return Err(FetchError::TooLarge { limit });
            }
        }
        let prealloc = declared
            .map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX))
            .min(MAX_PREALLOC)
            .min(limit);
        let mut body = BytesMut::with_capacity(prealloc);
        while let Some(chunk) = resp.chunk().await.map_err(map_reqwest_error)? {
            if chunk.len() > limit - body.len() {
                // Dropping `resp` here closes the connection mid-body.
                return Err(FetchError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

/// The `Display` texts of an error and its sources, joined with ": ".
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Maps a reqwest error to a [`FetchError`], surfacing any [`Carried`] error from the
/// resolver or the redirect policy unchanged.
fn map_reqwest_error(e: reqwest::Error) -> FetchError {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(Carried(inner)) = err.downcast_ref::<Carried>() {
            return inner.clone();
        }
        cur = err.source();
    }
    if e.is_timeout() {
        return FetchError::Timeout;
    }
    if e.is_builder() {
        return FetchError::InvalidUrl(error_chain(&e));
    }
    FetchError::Network(error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    #[test]
    fn forbidden_ipv4() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.1",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_forbidden_ip(ip(s)), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_ipv4() {
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "169.253.1.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.254",
            "93.184.216.34",
        ] {
            assert!(!is_forbidden_ip(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn forbidden_ipv6() {
        for s in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:0:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::10.1.2.3",
            "64:ff9b:1::8.8.8.8",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2002:c0a8:0101::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff05::1:3",
            "100::1",
            "1::1",
        ] {
            assert!(is_forbidden_ip(ip(s)), "{s} should be forbidden");
        }
    }

    #[test]
    fn allowed_ipv6() {
        for s in [
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "::ffff:0:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "2001:200::1",
        ] {
            assert!(!is_forbidden_ip(ip(s)), "{s} should be allowed");
        }
    }

    fn url(s: &str) -> Url {
        parse_url(s).expect("test URL parses")
    }

    #[test]
    fn check_url_normalised_spellings() {
        for s in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://0x7f.0.0.1/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://good.com@127.0.0.1/",
            "http://user:pw@10.0.0.1/",
            "https://[fe80::1]:8443/x",
            "http://0.0.0.0/",
            "http://0/",
            "HTTP://LOCALHOST@192.168.0.1/",
        ] {
            assert!(
                matches!(check_url(&url(s), false), Err(FetchError::ForbiddenHost(_))),
                "{s}: {:?}",
                check_url(&url(s), false)
            );
            // Allowed when private hosts are allowed (bar credentials).
            let allowed = check_url(&url(s), true);
            assert!(
                allowed.is_ok() || matches!(allowed, Err(FetchError::InvalidUrl(_))),
                "{s}: {allowed:?}"
            );
        }
    }

    #[test]
    fn check_url_public_and_names() {
        for s in [
            "http://8.8.8.8/a.jpg",
            "https://example.com/a.png",
            "https://[2606:4700::1111]/x",
            "http://localhost/", // names are checked at resolution time
        ] {
            assert_eq!(check_url(&url(s), false), Ok(()), "{s}");
        }
    }

    #[test]
    fn check_url_schemes_and_credentials() {
        for (s, scheme) in [
            ("file:///etc/passwd", "file"),
            ("ftp://x/", "ftp"),
            ("gopher://x/", "gopher"),
            ("data:image/png;base64,AAAA", "data"),
            ("javascript:alert(1)", "javascript"),
        ] {
            assert_eq!(
                check_url(&url(s), false),
                Err(FetchError::UnsupportedScheme(scheme.to_owned()))
            );
        }
        assert!(matches!(
            check_url(&url("https://user:pw@example.com/"), false),
            Err(FetchError::InvalidUrl(_))
        ));
        assert!(matches!(
            parse_url("not a url"),
            Err(FetchError::InvalidUrl(_))
        ));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(parse_url(&long), Err(FetchError::InvalidUrl(_))));
    }

    #[test]
    fn redirect_hops() {
        let public = url("https://example.com/next.jpg");
        // previous_len counts the first URL: the 1st redirect sees 1, the 5th sees 5.
        assert_eq!(check_redirect(&public, 1, 5, false), Ok(()));
        assert_eq!(check_redirect(&public, 5, 5, false), Ok(()));
        assert_eq!(
            check_redirect(&public, 6, 5, false),
            Err(FetchError::TooManyRedirects)
        );
        assert_eq!(
            check_redirect(&public, 1, 0, false),
            Err(FetchError::TooManyRedirects)
        );
        for s in [
            "http://127.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://2130706433/",
            "http://[::ffff:10.0.0.1]/",
        ] {
            assert!(
                matches!(
                    check_redirect(&url(s), 1, 5, false),
                    Err(FetchError::ForbiddenHost(_))
                ),
                "{s}"
            );
            assert_eq!(check_redirect(&url(s), 1, 5, true), Ok(()), "{s}");
        }
        assert_eq!(
            check_redirect(&url("file:///etc/passwd"), 1, 5, true),
            Err(FetchError::UnsupportedScheme("file".to_owned()))
        );
    }

    #[tokio::test]
    async fn resolver_filters_forbidden() {
        for host in [
            "localhost",
            "localhost.",
            "LocalHost",
            "foo.localhost",
            "127.0.0.1",
            "2130706433",
            "0x7f.1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                matches!(
                    resolve_host(host, false).await,
                    Err(FetchError::ForbiddenHost(_))
                ),
                "{host}"
            );
        }
        let addrs = resolve_host("localhost", true).await.expect("allowed");
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        let addrs = resolve_host("2130706433", true).await.expect("allowed");
        assert_eq!(addrs, vec![SocketAddr::new(ip("127.0.0.1"), 0)]);
        // Public literals are classified, never contacted.
        let addrs = resolve_host("8.8.8.8", false).await.expect("allowed");
        assert_eq!(addrs, vec![SocketAddr::new(ip("8.8.8.8"), 0)]);
    }

    #[test]
    fn error_texts_and_fault() {
        let e = FetchError::ForbiddenHost("127.0.0.1".to_owned());
        assert_eq!(
            e.to_string(),
            "image URL host resolves to a private or reserved address; refusing to fetch it"
        );
        assert!(e.is_client_fault());
        assert!(FetchError::Timeout.is_client_fault());
        assert!(FetchError::HttpStatus(500).is_client_fault());
        assert!(FetchError::Network("x".into()).is_client_fault());
        assert!(FetchError::TooLarge { limit: 1 }.is_client_fault());
        assert!(!FetchError::Client("x".into()).is_client_fault());
        // One text for every way the host failed to answer: no port probing.
        let texts: std::collections::HashSet<String> = [
            FetchError::Timeout,
            FetchError::HttpStatus(404),
            FetchError::Network("connection refused (os error 111)".into()),
            FetchError::Network("could not resolve host internal.corp: ...".into()),
        ]
        .iter()
        .map(|e| e.to_string())
        .collect();
        assert_eq!(texts.len(), 1, "{texts:?}");
        let text = texts.into_iter().next().unwrap();
        for leak in ["404", "111", "refused", "internal.corp", "timed out"] {
            assert!(!text.contains(leak), "{text}");
        }
        assert_eq!(
            FetchError::TooLarge { limit: 10 }.to_string(),
            "the image at the URL is larger than the limit of 10 bytes"
        );
    }

    #[test]
    fn defaults() {
        let c = FetchSettings::default();
        assert!(!c.allow_private_hosts);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.total_timeout, Duration::from_secs(20));
        assert_eq!(c.max_bytes, 10 * 1024 * 1024);
        assert_eq!(c.max_redirects, 5);
        assert!(USER_AGENT.starts_with("search-img/"));
        assert!(Fetcher::new(c).is_ok());
    }
}

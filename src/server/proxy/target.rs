//! Where a proxied request may go and what it carries, decided before anything is sent:
//! the upstream URL (the account's API base plus the caller's path and query, refused when
//! the path could leave that base) and the headers forwarded each way (never the caller's
//! `Authorization`, never a hop-by-hop header). Pure.

use axum::http::{HeaderMap, HeaderName, header};

/// Why a path is refused: each could make the request leave the API base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A `.` or `..` segment (climbing out of the base path).
    DotSegment,
    /// `%2F`, `%5C`, `%2E`, `%40` or `%25` in the path: an encoded `/`, `\`, `.`, `@`, or a
    /// double encoding a server might decode into one.
    EncodedSeparator,
    /// A backslash, which some servers read as `/`.
    Backslash,
    /// `@`, which would read as a user before a host.
    At,
    /// `scheme:` or `//` in front: an absolute or scheme-relative URL.
    Absolute,
    /// An empty segment inside the path (`a//b`).
    EmptySegment,
    /// A control character or space.
    Control,
    /// Nothing after `/proxy/{account}/`.
    Empty,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::DotSegment => "the path has a `.` or `..` segment",
            Refused::EncodedSeparator => {
                "the path has an encoded `/`, `\\`, `.`, `@` or `%` (%2F, %5C, %2E, %40, %25)"
            }
            Refused::Backslash => "the path has a backslash",
            Refused::At => "the path has an `@`",
            Refused::Absolute => "the path is an absolute URL (`scheme:` or `//` in front)",
            Refused::EmptySegment => "the path has an empty segment (`//`)",
            Refused::Control => "the path has a space or control character",
            Refused::Empty => "no API path after /proxy/{account}/",
        }
    }
}

/// `base` + `path` + `?query`. `path` is the raw (still percent-encoded) rest of the
/// caller's path after `/proxy/{account}`, starting with `/`; it is kept as written, and
/// the result is checked to be on `base`'s origin, under its path.
pub fn upstream_url(base: &url::Url, path: &str, query: Option<&str>) -> Result<url::Url, Refused> {
    let segments = check_path(path)?;
    let mut url = base.clone();
    let base_path = base.path().trim_end_matches('/');
    url.set_path(&format!("{base_path}/{}", segments.join("/")));
    url.set_query(query.filter(|q| !q.is_empty()));
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    if !same_origin || !url.path().starts_with(&format!("{base_path}/")) {
        return Err(Refused::Absolute);
    }
    Ok(url)
}

/// The path's segments, each refused if it could lead out of the base.
fn check_path(path: &str) -> Result<Vec<&str>, Refused> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest.is_empty() {
        return Err(Refused::Empty);
    }
    if rest.starts_with('/') {
        return Err(Refused::Absolute);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        let lower = seg.to_ascii_lowercase();
        if seg.is_empty() && i != last {
            return Err(Refused::EmptySegment);
        }
        if *seg == "." || *seg == ".." {
            return Err(Refused::DotSegment);
        }
        if ["%2f", "%5c", "%2e", "%40", "%25"]
            .iter()
            .any(|e| lower.contains(e))
        {
            return Err(Refused::EncodedSeparator);
        }
        if seg.contains('\\') {
            return Err(Refused::Backslash);
        }
        if seg.contains('@') {
            return Err(Refused::At);
        }
        if seg.chars().any(|c| c.is_control() || c == ' ') || lower.contains("%0") {
            return Err(Refused::Control);
        }
        if i == 0 && seg.contains(':') {
            return Err(Refused::Absolute);
        }
    }
    Ok(segments)
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and those a `Connection` header names: they
/// concern one connection and are never forwarded, either way.
fn hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    const FIXED: [&str; 6] = [
        "connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ];
    let n = name.as_str();
    FIXED.contains(&n)
        || n.starts_with("proxy-")
        || headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|listed| listed.trim().eq_ignore_ascii_case(n))
}

/// The caller's headers that go to the API: not hop-by-hop, not the caller's
/// `Authorization` (ours replaces it), not `Host` (the API's is set) nor `Content-Length`
/// (set for the body sent).
pub fn request_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        let dropped = [header::AUTHORIZATION, header::HOST, header::CONTENT_LENGTH];
        if !dropped.contains(name) && !hop_by_hop(name, incoming) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The API's headers passed back to the caller: all but hop-by-hop ones.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        if !hop_by_hop(name, upstream) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn base(b: &str) -> url::Url {
        url::Url::parse(b).unwrap()
    }

    fn to(b: &str, path: &str, query: Option<&str>) -> Result<String, Refused> {
        upstream_url(&base(b), path, query).map(|u| u.to_string())
    }

    #[test]
    fn a_path_and_query_are_appended_to_the_base_as_written() {
        let b = "https://open.tiktokapis.com";
        assert_eq!(
            to(b, "/v2/user/info/", Some("fields=open_id,display_name")),
            Ok("https://open.tiktokapis.com/v2/user/info/?fields=open_id,display_name".into())
        );
        assert_eq!(
            to("http://127.0.0.1:9/api/", "/v1/a%20b", None),
            Ok("http://127.0.0.1:9/api/v1/a%20b".into())
        );
        assert_eq!(
            to("https://graph.facebook.com", "/v24.0/me", Some("")),
            Ok("https://graph.facebook.com/v24.0/me".into())
        );
    }

    #[test]
    fn paths_that_could_leave_the_base_are_refused() {
        let b = "https://api.example.com/base";
        for (path, why) in [
            ("/../secret", Refused::DotSegment),
            ("/v2/../../x", Refused::DotSegment),
            ("/./x", Refused::DotSegment),
            ("/%2e%2e/x", Refused::EncodedSeparator),
            ("/v2/%2F%2Fevil.com", Refused::EncodedSeparator),
            ("/v2/%5c..", Refused::EncodedSeparator),
            ("/v2/%252e%252e/x", Refused::EncodedSeparator),
            ("/v2/%40evil.com", Refused::EncodedSeparator),
            ("/v2\\..\\x", Refused::Backslash),
            ("/user@evil.com/x", Refused::At),
            ("/https://evil.com/x", Refused::Absolute),
            ("//evil.com/x", Refused::Absolute),
            ("/http:evil.com", Refused::Absolute),
            ("/v2//x", Refused::EmptySegment),
            ("/v2/a%00b", Refused::Control),
            ("/", Refused::Empty),
            ("", Refused::Empty),
        ] {
            assert_eq!(to(b, path, None), Err(why), "{path}");
            assert!(!why.reason().is_empty());
        }
        // A query cannot move the request either: it stays a query.
        assert_eq!(
            to(b, "/x", Some("next=https://evil.com/@a")),
            Ok("https://api.example.com/base/x?next=https://evil.com/@a".into())
        );
    }

    #[test]
    fn the_callers_authorization_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer the-ops-secret"),
            ("host", "127.0.0.1:8787"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("x-private", "1"),
            ("content-length", "3"),
            ("content-type", "application/json"),
            ("accept", "*/*"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = request_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-type"]);
        let back = response_headers(&h);
        assert!(back.contains_key("content-type") && back.contains_key("content-length"));
        assert!(!back.contains_key("connection") && !back.contains_key("x-private"));
        assert!(!back.contains_key("transfer-encoding") && !back.contains_key("keep-alive"));
    }
}

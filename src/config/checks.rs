//! `KUBENURSE_EXTRA_CHECKS`: `name:url` entries separated by `|`, each probed as type `name`.
//! The URL says what the check does: `http://` and `https://` a GET (success is 200),
//! `tcp://host:port` a connection, `dns://name` and `dns://name@server[:port]` a DNS lookup.

use hickory_resolver::proto::rr::Name;

use crate::probe::{Check, DnsQuery};

/// Probe names the agent uses itself; extra checks may not take them.
const RESERVED_TYPES: [&str; 4] = ["api_server_direct", "api_server_dns", "me_ingress", "me_service"];

/// One `KUBENURSE_EXTRA_CHECKS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraCheck {
    pub name: String,
    pub url: http::Uri,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraChecks(pub Vec<ExtraCheck>);

pub(super) fn parse_extra_checks(s: &str) -> Result<ExtraChecks, String> {
    let mut checks: Vec<ExtraCheck> = Vec::new();
    for entry in s.split('|').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, url) = entry.split_once(':').ok_or_else(|| format!("entry {entry:?} is not name:url"))?;
        check_type_name(name)?;
        let (url, check) = parse_target(url.trim()).map_err(|e| format!("entry {name:?}: {e}"))?;
        if checks.iter().any(|c| c.name == name) {
            return Err(format!("check name {name:?} appears twice"));
        }
        checks.push(ExtraCheck { name: name.to_owned(), url, check });
    }
    Ok(ExtraChecks(checks))
}

/// Extra check names become the `type` label: short, plain and distinct from the agent's own.
fn check_type_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("check name {name:?} must be 1 to 63 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
        return Err(format!("check name {name:?} may only hold letters, digits, '_', '-' and '.'"));
    }
    if RESERVED_TYPES.contains(&name) || name.starts_with("path_") {
        return Err(format!("check name {name:?} is used by the agent's own probes"));
    }
    Ok(())
}

/// A check's URL and what it asks for. HTTP(S) URLs are probed as given, path included.
fn parse_target(s: &str) -> Result<(http::Uri, Check), String> {
    let url: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    let check = match url.scheme_str() {
        Some("http" | "https") if url.host().is_some_and(|h| !h.is_empty()) => Check::Http,
        Some("http" | "https") => return Err(format!("{s:?} has no host")),
        Some("tcp") => tcp(s, &url)?,
        Some("dns") => dns(s, &url)?,
        _ => return Err(format!("{s:?} is not an http://, https://, tcp://host:port or dns://name URL")),
    };
    Ok((url, check))
}

/// `tcp://host:port`: a host (name or address) and a port, nothing else.
fn tcp(s: &str, url: &http::Uri) -> Result<Check, String> {
    only_authority(s, url)?;
    let authority = url.authority().map_or("", |a| a.as_str());
    if authority.contains('@') {
        return Err(format!("{s:?}: tcp:// takes host:port only"));
    }
    let host = url.host().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    // `http::Uri` shows no port rather than a port out of range.
    match authority.strip_prefix(host).and_then(|rest| rest.strip_prefix(':')) {
        None | Some("") => return Err(format!("{s:?} has no port: tcp://host:port")),
        Some(port) if matches!(port.parse::<u16>(), Ok(1..)) => {}
        Some(port) => return Err(format!("{s:?}: port {port} is not a number from 1 to 65535")),
    }
    let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
    if unbracketed.parse::<std::net::IpAddr>().is_err() {
        dns_name(host).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(Check::Tcp)
}

/// `dns://name` (the system configuration) or `dns://name@server[:port]` (that server, the
/// name taken as absolute; the port defaults to 53).
fn dns(s: &str, url: &http::Uri) -> Result<Check, String> {
    only_authority(s, url)?;
    let authority = url.authority().map_or("", |a| a.as_str());
    let (name, server) = match authority.split_once('@') {
        Some((name, server)) => {
            let server = super::parse_dns_server(server).map_err(|e| format!("{s:?}: server {e}"))?;
            (name, Some(server))
        }
        None if authority.contains(':') => {
            return Err(format!("{s:?}: a port needs a server: dns://name@server:port"));
        }
        None => (authority, None),
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{s:?}: {name:?} is an address, not a name to look up"));
    }
    dns_name(name).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Check::Dns(DnsQuery { name: name.to_owned(), server }))
}

/// A DNS name: letters, digits, `-`, `_` and dots, labels of at most 63 and at most 253 in
/// all (an absolute name may end in a dot).
fn dns_name(name: &str) -> Result<(), String> {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if name.is_empty() || !plain || name.starts_with('.') || name.contains("..") {
        return Err(format!("{name:?} is not a DNS name"));
    }
    Name::from_utf8(name).map_err(|e| format!("{name:?} is not a DNS name: {e}"))?;
    Ok(())
}

/// `tcp://` and `dns://` targets have no path, query or fragment.
fn only_authority(s: &str, url: &http::Uri) -> Result<(), String> {
    match url.path_and_query().map(|p| p.as_str()) {
        None | Some("" | "/") if !s.ends_with('?') => Ok(()),
        _ => Err(format!("{s:?}: no path or query after the {} target", url.scheme_str().unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str) -> Result<Check, String> {
        parse_target(url).map(|(_, check)| check)
    }

    fn dns_query(name: &str, server: Option<&str>) -> Check {
        Check::Dns(DnsQuery { name: name.into(), server: server.map(|s| s.parse().expect("addr")) })
    }

    #[test]
    fn the_scheme_says_what_the_check_does() {
        assert_eq!(check("https://example.test/healthz"), Ok(Check::Http));
        assert_eq!(check("http://127.0.0.1:9/x?y=1"), Ok(Check::Http));
        assert_eq!(check("tcp://db.example.test:5432"), Ok(Check::Tcp));
        assert_eq!(check("tcp://10.0.0.1:22"), Ok(Check::Tcp));
        assert_eq!(check("tcp://[fd00::1]:443/"), Ok(Check::Tcp));
        assert_eq!(check("dns://kubernetes.default"), Ok(dns_query("kubernetes.default", None)));
        assert_eq!(
            check("dns://kubernetes.default.svc.cluster.local@10.96.0.10"),
            Ok(dns_query("kubernetes.default.svc.cluster.local", Some("10.96.0.10:53")))
        );
        assert_eq!(check("dns://example.test.@127.0.0.1:5353"), Ok(dns_query("example.test.", Some("127.0.0.1:5353"))));
        assert_eq!(
            check("dns://_dns._udp.example.test@[fd00::10]:53"),
            Ok(dns_query("_dns._udp.example.test", Some("[fd00::10]:53")))
        );
    }

    #[test]
    fn tcp_and_dns_targets_show_as_written() {
        let (url, _) = parse_target("tcp://db.example.test:5432").expect("tcp");
        let target =
            crate::probe::Target { kind: "db".into(), url, check: Check::Tcp, bearer_token: false, peer: None };
        assert_eq!(target.location(), "tcp://db.example.test:5432");
        let (url, check) = parse_target("dns://a.test@127.0.0.1:53").expect("dns");
        let target = crate::probe::Target { kind: "a".into(), url, check, bearer_token: false, peer: None };
        assert_eq!(target.location(), "dns://a.test@127.0.0.1:53");
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (url, problem) in [
            ("ftp://example.test/", "is not an http://"),
            ("example.test:80", "is not an http://"),
            ("https:///x", "not a URL"),
            ("tcp://example.test", "has no port"),
            ("tcp://example.test:0", "port 0"),
            ("tcp://example.test:99999", "port 99999"),
            ("tcp://example.test:", "has no port"),
            ("tcp://example.test:80/path", "no path"),
            ("tcp://user@example.test:80", "host:port only"),
            ("tcp://bad_host!:80", "is not a DNS name"),
            ("dns://", "not a URL"),
            ("dns://example.test:53", "a port needs a server"),
            ("dns://example.test@10.0.0.1:99999", "is not an IP address"),
            ("dns://example.test@dns.example.test", "is not an IP address"),
            ("dns://example.test@10.0.0.1:0", "port 0"),
            ("dns://@10.0.0.1", "is not a DNS name"),
            ("dns://10.0.0.1", "is an address"),
            ("dns://a..b", "is not a DNS name"),
            ("dns://example.test/x", "no path"),
            ("dns://example.test?x", "no path"),
            ("dns://a%41b@10.0.0.1", "is not a DNS name"),
        ] {
            let error = check(url).expect_err(url);
            assert!(error.contains(problem), "{url}: {error:?} does not say {problem:?}");
        }
        let long = format!("dns://{}.test", "a".repeat(64));
        assert!(check(&long).expect_err("label too long").contains("not a DNS name"));
    }
}

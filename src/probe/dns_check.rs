//! The DNS check (`dns://name`, `dns://name@server:port`): an A and an AAAA query for the
//! name, at the same time, within the probe's deadline; one attempt, nothing cached. Success
//! is an address in either answer; both answers are awaited, so a lost or slow AAAA answer
//! shows in the check's duration.
//!
//! With a server, the name is taken as absolute and asked of that server alone. Without, the
//! system configuration applies: the servers of `/etc/resolv.conf` (or
//! `KUBENURSE_DNS_SERVERS`), its search list and `ndots`, each candidate name in turn until one
//! has an address, as the C library does. The hosts file is not read: the check is about the
//! DNS servers.
//!
//! When no candidate has an address, the failure reported is the most telling one: a timeout
//! before a SERVFAIL, before a REFUSED, before any other error, before an empty answer, before
//! NXDOMAIN (which the search list produces for every name but the right one).

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::TokioResolver;
use tokio::time::{timeout_at, Instant};

use super::model::DnsQuery;
use super::resolve::{cause, Resolver};

/// Why a DNS check failed: the text for `/alive` and the class of the error.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct DnsCheckError {
    /// `timeout`, `nxdomain`, `servfail`, `refused`, `no_address`, or `None` for other errors.
    pub cause: Option<&'static str>,
    text: String,
}

impl Resolver {
    /// Asks for the A and AAAA records of the check's name until `deadline` (`timeout` after
    /// the start, for the texts); the addresses of the first name that has any.
    pub async fn check_name(
        &self,
        query: &DnsQuery,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<IpAddr>, DnsCheckError> {
        let name = Name::from_utf8(&query.name)
            .map_err(|e| DnsCheckError { cause: None, text: format!("lookup {}: invalid name: {e}", query.name) })?;
        let candidates = self.candidates(name, query.server.is_some());
        let resolver = self.for_check(query.server, timeout).map_err(|e| DnsCheckError {
            cause: None,
            text: format!("lookup {}: cannot build the resolver: {e}", query.name),
        })?;
        let mut worst: Option<(&Name, Problem)> = None;
        for candidate in &candidates {
            let (a, aaaa) = tokio::join!(
                ask(&resolver, candidate, RecordType::A, deadline, timeout),
                ask(&resolver, candidate, RecordType::AAAA, deadline, timeout),
            );
            let problem = match (a, aaaa) {
                (Ok(mut v4), Ok(v6)) => {
                    v4.extend(v6);
                    return Ok(v4);
                }
                (Ok(found), Err(_)) | (Err(_), Ok(found)) => return Ok(found),
                (Err(a), Err(aaaa)) => Problem::both(a, aaaa),
            };
            if worst.as_ref().is_none_or(|(_, w)| problem.rank() > w.rank()) {
                worst = Some((candidate, problem));
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let Some((name, problem)) = worst else {
            return Err(DnsCheckError { cause: None, text: format!("lookup {}: no name to ask", query.name) });
        };
        let tried = match candidates.len() {
            1 => String::new(),
            n => format!(" ({n} names tried with the search list)"),
        };
        Err(DnsCheckError {
            cause: problem.cause,
            text: format!("lookup {}: {}{tried}", name.to_string().trim_end_matches('.'), problem.text),
        })
    }

    /// The absolute names to ask, in order: the name alone when it is absolute (or a server
    /// was given); else the search list, with the name as given first when it has at least
    /// `ndots` dots and last otherwise.
    fn candidates(&self, name: Name, absolute: bool) -> Vec<Name> {
        let mut as_given = name.clone();
        as_given.set_fqdn(true);
        if absolute || name.is_fqdn() {
            return vec![as_given];
        }
        let mut names = Vec::with_capacity(self.system.search().len() + 1);
        let given_first = usize::from(name.num_labels()) > self.options.ndots;
        if given_first {
            names.push(as_given.clone());
        }
        for domain in self.system.search() {
            if let Ok(mut searched) = name.clone().append_domain(domain) {
                searched.set_fqdn(true);
                if !names.contains(&searched) {
                    names.push(searched);
                }
            }
        }
        if !given_first && !names.contains(&as_given) {
            names.push(as_given);
        }
        names
    }
}

/// One query: the addresses of its answer, or why there are none.
async fn ask(
    resolver: &TokioResolver,
    name: &Name,
    kind: RecordType,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<IpAddr>, Problem> {
    let lookup = match timeout_at(deadline, resolver.lookup(name.clone(), kind)).await {
        Err(_) => return Err(Problem::timed_out(timeout)),
        Ok(Err(e)) => return Err(Problem::of(&e, timeout)),
        Ok(Ok(lookup)) => lookup,
    };
    let found: Vec<IpAddr> = lookup.answers().iter().filter_map(|record| record.data.ip_addr()).collect();
    if found.is_empty() {
        return Err(Problem { cause: Some("no_address"), text: "no address".into() });
    }
    Ok(found)
}

/// Why a query (or a name's pair of queries) found no address.
#[derive(Debug)]
struct Problem {
    cause: Option<&'static str>,
    text: String,
}

impl Problem {
    fn timed_out(timeout: Duration) -> Self {
        Problem { cause: Some("timeout"), text: format!("timed out after {timeout:?}") }
    }

    fn of(error: &NetError, timeout: Duration) -> Self {
        let cause = cause(error);
        let text = match cause {
            Some("timeout") => return Self::timed_out(timeout),
            Some("nxdomain") => "NXDOMAIN".to_owned(),
            Some("servfail") => "SERVFAIL".to_owned(),
            Some("no_address") => "no address".to_owned(),
            _ => error.to_string(),
        };
        Problem { cause, text }
    }

    /// The A and the AAAA query's problems as one: the same text once, or both texts with
    /// the more telling cause.
    fn both(a: Problem, aaaa: Problem) -> Self {
        if a.text == aaaa.text {
            return a;
        }
        let cause = if aaaa.rank() > a.rank() { aaaa.cause } else { a.cause };
        Problem { cause, text: format!("A: {}, AAAA: {}", a.text, aaaa.text) }
    }

    /// How telling the problem is: NXDOMAIN is what a search list yields for every name but
    /// the right one, a timeout means the servers did not answer at all.
    fn rank(&self) -> u8 {
        match self.cause {
            Some("nxdomain") => 0,
            Some("no_address") => 1,
            Some("refused") => 3,
            Some("servfail") => 4,
            Some("timeout") => 5,
            _ => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(cause: Option<&'static str>, text: &str) -> Problem {
        Problem { cause, text: text.into() }
    }

    #[test]
    fn the_two_queries_make_one_problem() {
        let same = Problem::both(problem(Some("nxdomain"), "NXDOMAIN"), problem(Some("nxdomain"), "NXDOMAIN"));
        assert_eq!((same.cause, same.text.as_str()), (Some("nxdomain"), "NXDOMAIN"));
        let mixed = Problem::both(problem(Some("no_address"), "no address"), problem(Some("servfail"), "SERVFAIL"));
        assert_eq!((mixed.cause, mixed.text.as_str()), (Some("servfail"), "A: no address, AAAA: SERVFAIL"));
        let timed_out = Problem::both(Problem::timed_out(Duration::from_secs(1)), problem(None, "io error"));
        assert_eq!(timed_out.cause, Some("timeout"));
    }

    fn resolver(resolv_conf: &str) -> Resolver {
        Resolver::new(resolv_conf.as_bytes(), b"", None).expect("resolver")
    }

    fn names(resolver: &Resolver, name: &str, absolute: bool) -> Vec<String> {
        let name = Name::from_utf8(name).expect("name");
        resolver.candidates(name, absolute).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn names_follow_the_search_list_and_ndots() {
        let r = resolver("nameserver 127.0.0.1\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:2\n");
        assert_eq!(
            names(&r, "kubernetes", false),
            ["kubernetes.ns.svc.cluster.local.", "kubernetes.svc.cluster.local.", "kubernetes."]
        );
        assert_eq!(names(&r, "a.b.c", false), ["a.b.c.", "a.b.c.ns.svc.cluster.local.", "a.b.c.svc.cluster.local."]);
        assert_eq!(names(&r, "absolute.test.", false), ["absolute.test."]);
        assert_eq!(names(&r, "kubernetes", true), ["kubernetes."], "a given server: the name as absolute");
        assert_eq!(names(&resolver("nameserver 127.0.0.1\n"), "kubernetes", false), ["kubernetes."]);
    }
}

//! A DNS server on loopback (UDP), answering each name as a test sets it: addresses,
//! NXDOMAIN, SERVFAIL, or never, alike for every record type or by type. Names it was not told about are NXDOMAIN, so a search list
//! on the machine running the tests only adds a few refused names. Point an agent at it with
//! [`DnsServer::flag`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// How the server answers a name.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A queries get the IPv4 addresses, AAAA queries the IPv6 ones, in this order.
    Addresses(Vec<IpAddr>),
    NxDomain,
    ServFail,
    /// The query is dropped: the resolver waits in vain.
    Silent,
    /// A queries get the first answer, every other type the second.
    ByType(Box<Answer>, Box<Answer>),
}

type Answers = Arc<Mutex<HashMap<String, Answer>>>;

/// A running DNS server.
pub struct DnsServer {
    pub addr: SocketAddr,
    answers: Answers,
    /// `name TYPE` of every query received, in order.
    queries: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    /// A server on `ip`, UDP port chosen by the system.
    pub async fn start(ip: &str) -> DnsServer {
        let socket = UdpSocket::bind((ip, 0)).await.expect("bind dns");
        let addr = socket.local_addr().expect("addr");
        let answers = Answers::default();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(socket, answers.clone(), queries.clone()));
        DnsServer { addr, answers, queries, task }
    }

    /// How to answer `name` (without the trailing dot) from now on.
    pub fn answer(&self, name: &str, answer: Answer) {
        self.answers.lock().expect("answers").insert(normalize(name), answer);
    }

    /// The agent flag that makes its resolver ask this server.
    pub fn flag(&self) -> String {
        format!("--dns-servers={}", self.addr)
    }

    /// How many queries of `kind` (`A`, `AAAA`) asked for `name`.
    pub fn asked(&self, name: &str, kind: &str) -> usize {
        let wanted = format!("{} {kind}", normalize(name));
        self.queries.lock().expect("queries").iter().filter(|q| **q == wanted).count()
    }

    /// Every query received so far, `name TYPE`.
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().expect("queries").clone()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve(socket: UdpSocket, answers: Answers, queries: Arc<Mutex<Vec<String>>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else { continue };
        let Ok(request) = Message::from_vec(&buf[..len]) else { continue };
        let Some(query) = request.queries.first().cloned() else { continue };
        let name = normalize(&query.name().to_ascii());
        queries.lock().expect("queries").push(format!("{name} {}", query.query_type()));
        let mut answer = answers.lock().expect("answers").get(&name).cloned().unwrap_or(Answer::NxDomain);
        if let Answer::ByType(a, other) = answer {
            answer = if query.query_type() == RecordType::A { *a } else { *other };
        }

        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.message_type = MessageType::Response;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_query(query.clone());
        match answer {
            Answer::Silent | Answer::ByType(..) => continue,
            Answer::NxDomain => response.metadata.response_code = ResponseCode::NXDomain,
            Answer::ServFail => response.metadata.response_code = ResponseCode::ServFail,
            Answer::Addresses(addrs) => {
                for ip in addrs {
                    let rdata = match (ip, query.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(query.name().clone(), 0, rdata));
                }
            }
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

//! Who holds the listeners' connection slots, and who gives one up when they are all taken.
//!
//! One table serves the plain and the TLS listener, and it is fair by source address. When it
//! is full, a newcomer takes the slot of the oldest connection of the address that holds the
//! most connections, provided that address holds more than the newcomer's own: a client can
//! never push out an address lighter than itself, and a client that reconnects as soon as it
//! is closed cannot win its slot back from the lighter address that took it. One address holds
//! at most `per_address` connections: more are refused, and the ones it has keep working.
//!
//! So the kubelet's probes (from the node's address) and neighbour probes (one address per
//! pod) get a slot whatever a few hostile addresses do. An attacker with more addresses than
//! the table has slots can still fill it with one connection each: no per-address scheme
//! helps against that.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

use crate::sync::lock;

/// The connection slots of an agent's listeners.
#[derive(Debug)]
pub struct Connections {
    capacity: usize,
    per_address: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    /// Connection ids per address, oldest first (ids only grow).
    by_address: HashMap<IpAddr, VecDeque<u64>>,
}

#[derive(Debug)]
struct Entry {
    address: IpAddr,
    task: Option<AbortHandle>,
    reset: Arc<AtomicBool>,
}

/// The answer to a connection that asks for a slot.
#[derive(Debug)]
pub enum Admission {
    /// A free slot.
    Free(Slot),
    /// The slot of a connection from `pushed_out`, which is being closed.
    Took { slot: Slot, pushed_out: IpAddr },
    /// No slot: this address holds its share already, or every other address holds no more
    /// connections than this one.
    Refused,
}

impl Admission {
    /// The slot, if one was given.
    pub fn slot(self) -> Option<Slot> {
        match self {
            Admission::Free(slot) | Admission::Took { slot, .. } => Some(slot),
            Admission::Refused => None,
        }
    }
}

/// Names a slot while its [`Slot`] is owned by a task.
#[derive(Debug, Clone, Copy)]
pub struct SlotId(u64);

/// A connection's hold on a slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    /// Set when the connection is cut (pushed out, stalled, past its grace): its socket then
    /// closes with a reset, so the kernel drops what is still queued for a client that does
    /// not read.
    pub reset: Arc<AtomicBool>,
    connections: Arc<Connections>,
}

impl Connections {
    pub fn new(capacity: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self { capacity: capacity.max(1), per_address: per_address.max(1), table: Mutex::default() })
    }

    /// A slot for a connection from `address`, pushing out another connection if needed.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Admission {
        let address = address.to_canonical();
        let mut table = lock(&self.table);
        let held = table.by_address.get(&address).map_or(0, VecDeque::len);
        if held >= self.per_address {
            return Admission::Refused;
        }
        let victim = if table.open.len() >= self.capacity {
            match table.heaviest_above(held) {
                Some(victim) => Some(victim),
                None => return Admission::Refused,
            }
        } else {
            None
        };
        let pushed_out = victim.and_then(|victim| table.remove(victim)).map(|entry| {
            entry.reset.store(true, Ordering::SeqCst);
            if let Some(task) = entry.task {
                task.abort();
            }
            entry.address
        });
        let id = table.next_id;
        table.next_id += 1;
        let reset = Arc::new(AtomicBool::new(false));
        table.open.insert(id, Entry { address, task: None, reset: reset.clone() });
        table.by_address.entry(address).or_default().push_back(id);
        let slot = Slot { id, reset, connections: self.clone() };
        match pushed_out {
            None => Admission::Free(slot),
            Some(pushed_out) => Admission::Took { slot, pushed_out },
        }
    }

    /// Tells the table which task serves slot `id`, so that it can be pushed out. False when
    /// the slot is gone already (pushed out, or the task ended): the caller then aborts the
    /// task itself.
    pub fn attach(&self, id: SlotId, task: AbortHandle) -> bool {
        match lock(&self.table).open.get_mut(&id.0) {
            Some(entry) => {
                entry.task = Some(task);
                true
            }
            None => false,
        }
    }

    /// Connections that fit.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.table).open.len()
    }

    /// Connections open now from `address`.
    pub fn open_from(&self, address: IpAddr) -> usize {
        lock(&self.table).by_address.get(&address.to_canonical()).map_or(0, VecDeque::len)
    }
}

impl Table {
    /// The oldest connection of the heaviest address holding more than `held` connections;
    /// among equally heavy addresses, the one whose oldest connection is oldest.
    fn heaviest_above(&self, held: usize) -> Option<u64> {
        self.by_address
            .values()
            .filter(|ids| ids.len() > held)
            .filter_map(|ids| Some((ids.len(), std::cmp::Reverse(*ids.front()?))))
            .max()
            .map(|(_, std::cmp::Reverse(id))| id)
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(ids) = self.by_address.get_mut(&entry.address) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_address.remove(&entry.address);
            }
        }
        Some(entry)
    }
}

impl Slot {
    /// Names the slot for [`Connections::attach`].
    pub fn id(&self) -> SlotId {
        SlotId(self.id)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections.table).remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// A task that runs until aborted, standing in for a connection.
    fn held(slot: &Slot) -> tokio::task::JoinHandle<()> {
        let task = tokio::spawn(std::future::pending());
        assert!(slot.connections.attach(slot.id(), task.abort_handle()));
        task
    }

    #[tokio::test]
    async fn a_full_table_gives_the_lighter_address_the_slot_of_the_heaviest() {
        let table = Connections::new(4, 4);
        let a: Vec<Slot> = (0..3).map(|_| table.admit(ip(1)).slot().expect("a")).collect();
        let b = table.admit(ip(2)).slot().expect("b");
        let mut a_tasks: Vec<_> = a.iter().map(held).collect();
        let b_task = held(&b);
        assert_eq!(table.open(), 4);

        let c = table.admit(ip(3)).slot().expect("a newcomer gets a slot");
        assert_eq!((table.open_from(ip(1)), table.open_from(ip(2)), table.open_from(ip(3))), (2, 1, 1));
        assert!(a[0].reset.load(Ordering::SeqCst), "the oldest connection of the heaviest address went");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), &mut a_tasks[0]).await;
        assert!(ended.expect("aborted in time").is_err_and(|e| e.is_cancelled()));
        assert!(!b.reset.load(Ordering::SeqCst) && !b_task.is_finished());

        // The pushed-out address reconnects at once: it is not lighter than anyone, so it
        // cannot take the newcomer's slot back.
        assert!(matches!(table.admit(ip(1)), Admission::Refused));
        assert!(!c.reset.load(Ordering::SeqCst));
        assert_eq!(table.open(), 4);
    }

    #[tokio::test]
    async fn an_address_never_pushes_out_a_lighter_or_equal_one() {
        let table = Connections::new(3, 3);
        let _slots: Vec<Slot> = [1, 2, 3].iter().map(|&i| table.admit(ip(i)).slot().expect("slot")).collect();
        // Everyone holds one; a newcomer with none is lighter and takes the oldest.
        let _d = table.admit(ip(4)).slot().expect("lighter newcomer");
        assert_eq!(table.open_from(ip(1)), 0);
        // An address that already holds one is not lighter than anyone holding one.
        assert!(matches!(table.admit(ip(4)), Admission::Refused));
        assert!(matches!(table.admit(ip(2)), Admission::Refused));
        assert_eq!(table.open(), 3);
    }

    #[test]
    fn one_address_beyond_its_share_is_refused() {
        let table = Connections::new(100, 2);
        let first = table.admit(ip(1)).slot().expect("first");
        let _second = table.admit(ip(1)).slot().expect("second");
        assert!(matches!(table.admit(ip(1)), Admission::Refused));
        assert!(!first.reset.load(Ordering::SeqCst), "the connections it has keep working");
        let _other = table.admit(ip(2)).slot().expect("other addresses still get in");
        drop(first);
        let _again = table.admit(ip(1)).slot().expect("a freed slot is its again");
        assert_eq!((table.open_from(ip(1)), table.open()), (2, 3));
    }

    #[test]
    fn closing_frees_the_slot_and_a_pushed_out_slot_cannot_attach() {
        let table = Connections::new(1, 1);
        let a = table.admit(ip(1)).slot().expect("a");
        drop(a);
        assert_eq!(table.open(), 0);
        let b = table.admit(ip(1)).slot().expect("b");
        let _c = table.admit(ip(2)).slot().expect("c pushes b out");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let task = rt.spawn(std::future::pending::<()>());
        assert!(!table.attach(b.id(), task.abort_handle()), "b's slot is gone");
        drop(b);
        assert_eq!(table.open(), 1, "dropping a pushed-out slot frees nothing else");
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let table = Connections::new(10, 1);
        let _v4 = table.admit(ip(7)).slot().expect("v4");
        let mapped: IpAddr = "::ffff:127.0.0.7".parse().expect("mapped");
        assert!(matches!(table.admit(mapped), Admission::Refused), "the same client, over its share");
        assert_eq!(table.open_from(mapped), 1);
    }
}

//! A userspace NFQUEUE worker in a node's namespace: the thread that binds the queues, the
//! iptables rules that feed them once it is ready, and their removal. The delay line
//! ([`crate::delay`]) and the session evictor ([`crate::session`]) are two such workers.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::netns;

/// A running worker; dropping it removes its rules, then stops and joins its thread.
#[derive(Debug)]
pub(crate) struct QueueWorker {
    netns: String,
    /// What the logs call it.
    what: &'static str,
    /// The iptables words that remove its rules.
    flush: &'static [&'static str],
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Why a worker did not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Its queue could not be opened or bound.
    Queue(io::Error),
    /// Its rules could not be installed.
    Rules(netns::CommandError),
}

/// What a worker is.
pub(crate) struct Worker<F> {
    /// The namespace.
    pub(crate) netns: String,
    /// The thread's name.
    pub(crate) thread: String,
    /// What the logs call it.
    pub(crate) what: &'static str,
    /// The iptables table its rules go to.
    pub(crate) table: &'static str,
    /// The rules (iptables words after the table), installed once the queues are bound.
    pub(crate) rules: Vec<Vec<String>>,
    /// The iptables words that remove its rules.
    pub(crate) flush: &'static [&'static str],
    /// The thread's body: it says on the sender when its queues are bound (rules without a
    /// listener would drop every packet), then runs until the flag is set.
    pub(crate) body: F,
}

impl QueueWorker {
    /// Starts `worker`: its thread in its namespace, then, once the queues are bound, its rules.
    pub(crate) fn start<F>(worker: Worker<F>) -> Result<Self, StartError>
    where
        F: FnOnce(&AtomicBool, &mpsc::SyncSender<io::Result<()>>) -> io::Result<()>
            + Send
            + 'static,
    {
        let Worker {
            netns,
            thread,
            what,
            table,
            rules,
            flush,
            body,
        } = worker;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let handle = netns::spawn(&netns, thread, {
            let stop = Arc::clone(&stop);
            move || body(&stop, &ready_tx)
        })
        .map_err(StartError::Queue)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Queue(e)),
            Err(_) => {
                let e = match handle.join() {
                    Ok(Err(e)) => e,
                    _ => io::Error::other(format!("the {what} ended before it was ready")),
                };
                return Err(StartError::Queue(e));
            }
        }
        // From here on, dropping the worker undoes whatever part of the rules went in.
        let worker = Self {
            netns,
            what,
            flush,
            stop,
            thread: Some(handle),
        };
        for rule in rules {
            let mut args = vec!["-w", "-t", table];
            args.extend(rule.iter().map(String::as_str));
            netns::run(Some(&worker.netns), "iptables", &args, None).map_err(StartError::Rules)?;
        }
        Ok(worker)
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        let what = self.what;
        if netns::exists(&self.netns)
            && let Err(e) = netns::run(Some(&self.netns), "iptables", self.flush, None)
        {
            tracing::warn!(netns = %self.netns, "removing the {what}'s rules: {}", crate::chain(&e));
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(netns = %self.netns, "the {what} ended with: {e}"),
                Err(_) => tracing::warn!(netns = %self.netns, "the {what} panicked"),
            }
        }
    }
}

/// Opens a worker's queue with `setup` and says on `ready` whether that worked.
pub(crate) fn open(
    ready: &mpsc::SyncSender<io::Result<()>>,
    setup: impl FnOnce() -> io::Result<nfq::Queue>,
) -> io::Result<nfq::Queue> {
    let opened = setup();
    let _ = ready.send(match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    });
    opened
}

/// Gives the kernel `verdict` on `msg`. A packet the kernel no longer holds (`ENOENT`: its
/// queue's rules or its namespace are being removed) is no error: nothing is left to release,
/// and a worker that stopped on it would leave its link without a queue reader.
pub(crate) fn release(
    q: &mut nfq::Queue,
    mut msg: nfq::Message,
    verdict: nfq::Verdict,
) -> io::Result<()> {
    msg.set_verdict(verdict);
    match q.verdict(msg) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

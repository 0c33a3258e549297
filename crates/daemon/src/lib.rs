//! daemon: natpunch's connectivity daemon, which hands applications a connected socket, direct
//! when the NATs allow it and relayed when they do not.
//!
//! So far this crate holds the daemon's application API ([`api`]): the requests an application
//! sends over the daemon's Unix socket, the events it gets back, and a sans-IO codec for the
//! JSON lines they travel as, bounded and safe on any bytes. `docs/daemon-api.md` specifies the
//! same API for applications in any language.
//!
//! What it does not do (yet): run the daemon, pass file descriptors, or punch; the technique
//! sequencer and the shell around it come next.

pub mod api;

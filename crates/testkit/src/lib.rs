//! testkit: test servers for behaviour real routers in the lab do not produce, and the checks
//! that tests needing the machine make first; never used by production code.
//!
//! * [`igd`]: a fake UPnP Internet Gateway Device (SSDP responder, device and service
//!   descriptions, SOAP control of a port-mapping table) with switchable refusals, such as a
//!   router that only accepts permanent leases.
//! * [`require`]: what tests that need root, the NAT lab or a program call first; they fail
//!   naming what is missing, never skip.

pub mod igd;
pub mod require;

//! testkit: test servers for behaviour real routers in the lab do not produce; never used by
//! production code.
//!
//! * [`igd`]: a fake UPnP Internet Gateway Device (SSDP responder, device and service
//!   descriptions, SOAP control of a port-mapping table) with switchable refusals, such as a
//!   router that only accepts permanent leases.

pub mod igd;

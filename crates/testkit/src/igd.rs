//! A fake UPnP Internet Gateway Device: an IGD:1 whose WANConnectionDevice offers one
//! WANIPConnection:1 service, backed by an in-memory port-mapping table.
//!
//! It answers SSDP `M-SEARCH` (multicast on 239.255.255.250:1900 and/or unicast on a chosen
//! port), serves its device and service descriptions over a minimal HTTP/1.1 server, and
//! executes the SOAP actions a port-mapping client uses. Every SOAP call is recorded with the
//! UPnP error code it was answered with, so tests can assert on what a client actually asked.
//! Malformed input is answered (HTTP 400/413, UPnP 401/402) or ignored, never a panic.

use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

const DEVICE_TYPE: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
const SERVICE_TYPE: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
const UUID: &str = "6e617470-756e-6368-2d74-6573746b6974";
const DESC_PATH: &str = "/rootDesc.xml";
const SCPD_PATH: &str = "/scpd/wanipconn.xml";
const CONTROL_PATH: &str = "/control/wanipconn";
const XML: &str = "text/xml; charset=\"utf-8\"";
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// The longest one HTTP connection may take to deliver its request.
const CONN_DEADLINE: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
/// The search targets answered: those igd-next sends, plus the generic ones.
const SEARCH_TARGETS: [&str; 5] = [
    DEVICE_TYPE,
    SERVICE_TYPE,
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
    "ssdp:all",
    "upnp:rootdevice",
];
const MAPPING_ARGS: [&str; 8] = [
    "NewRemoteHost",
    "NewExternalPort",
    "NewProtocol",
    "NewInternalPort",
    "NewInternalClient",
    "NewEnabled",
    "NewPortMappingDescription",
    "NewLeaseDuration",
];
/// The service's actions as (name, input arguments, output arguments).
const ACTIONS: [(&str, &[&str], &[&str]); 5] = [
    ("AddPortMapping", &MAPPING_ARGS, &[]),
    ("AddAnyPortMapping", &MAPPING_ARGS, &["NewReservedPort"]),
    (
        "DeletePortMapping",
        &["NewRemoteHost", "NewExternalPort", "NewProtocol"],
        &[],
    ),
    ("GetExternalIPAddress", &[], &["NewExternalIPAddress"]),
    (
        "GetGenericPortMappingEntry",
        &["NewPortMappingIndex"],
        &MAPPING_ARGS,
    ),
];
const INVALID_ARGS: (u16, &str) = (402, "Invalid Args");

/// How a [`FakeIgd`] is reached and how it behaves.
#[derive(Debug, Clone)]
pub struct FakeIgdConfig {
    /// Address to serve HTTP and unicast SSDP on, whose interface joins the SSDP multicast
    /// group; it is the host of the advertised `LOCATION`.
    pub lan_ip: Ipv4Addr,
    /// The address answered to `GetExternalIPAddress`.
    pub external_ip: Ipv4Addr,
    /// Refuse `AddPortMapping`/`AddAnyPortMapping` with a lease other than 0 (permanent) with
    /// UPnP error 725 OnlyPermanentLeasesSupported, as many consumer routers do.
    pub only_permanent_leases: bool,
    /// Bind 0.0.0.0:1900 (SO_REUSEADDR) and join 239.255.255.250 on the interface of `lan_ip`;
    /// if that fails, [`FakeIgd::start`] fails.
    pub multicast_ssdp: bool,
    /// Also answer `M-SEARCH` sent unicast to `lan_ip` on this UDP port (0: an ephemeral port,
    /// see [`FakeIgd::ssdp_unicast_addr`]), for tests without multicast.
    pub ssdp_unicast_port: Option<u16>,
}

/// One SOAP action received by the fake, and how it was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoapCall {
    /// The action name (from the `SOAPAction` header, else the body); empty if neither has one.
    pub action: String,
    /// The action's input arguments found in the body, in schema order, unescaped.
    pub args: Vec<(String, String)>,
    /// The UPnP error code answered, `None` for success.
    pub error_code: Option<u16>,
}

/// One entry of the fake's port-mapping table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMapping {
    /// "UDP" or "TCP".
    pub protocol: String,
    /// External (WAN) port.
    pub external_port: u16,
    /// The internal client as the request gave it.
    pub internal_client: String,
    /// Internal port.
    pub internal_port: u16,
    /// Lease requested in seconds (0: permanent); not counted down.
    pub lease_secs: u32,
    /// The description the mapping was made with.
    pub description: String,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<SoapCall>,
    table: Vec<FakeMapping>,
}

#[derive(Debug)]
struct Shared {
    config: FakeIgdConfig,
    location: SocketAddr,
    stop: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A running fake IGD; dropping it stops and joins its threads.
#[derive(Debug)]
pub struct FakeIgd {
    shared: Arc<Shared>,
    ssdp_unicast: Option<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeIgd {
    /// Starts the server threads; sockets are created in the calling thread's network namespace.
    pub fn start(config: FakeIgdConfig) -> io::Result<Self> {
        let lan = config.lan_ip;
        let listener = TcpListener::bind((lan, 0))?;
        listener.set_nonblocking(true)?;
        // SSDP sockets as (receiving, answering): multicast answers leave from `lan_ip`.
        let mut ssdp = Vec::new();
        if config.multicast_ssdp {
            ssdp.push((multicast_socket(lan)?, UdpSocket::bind((lan, 0))?));
        }
        let mut ssdp_unicast = None;
        if let Some(port) = config.ssdp_unicast_port {
            let socket = UdpSocket::bind((lan, port))?;
            ssdp_unicast = Some(socket.local_addr()?);
            ssdp.push((socket.try_clone()?, socket));
        }
        let location = listener.local_addr()?;
        let (stop, state) = (AtomicBool::new(false), Mutex::default());
        let shared = Arc::new(Shared {
            config,
            location,
            stop,
            state,
        });
        // Built before spawning, so that an error part-way stops what already runs.
        let mut igd = Self {
            shared,
            ssdp_unicast,
            threads: Vec::new(),
        };
        let shared = Arc::clone(&igd.shared);
        igd.threads.push(spawn("fake-igd-http", move || {
            accept_loop(&shared, &listener)
        })?);
        for (socket, reply) in ssdp {
            socket.set_read_timeout(Some(POLL))?;
            let shared = Arc::clone(&igd.shared);
            igd.threads.push(spawn("fake-igd-ssdp", move || {
                ssdp_loop(&shared, &socket, &reply);
            })?);
        }
        Ok(igd)
    }

    /// The HTTP address (the `LOCATION` host and port).
    pub fn location(&self) -> SocketAddr {
        self.shared.location
    }

    /// Where unicast `M-SEARCH` is answered, if configured.
    pub fn ssdp_unicast_addr(&self) -> Option<SocketAddr> {
        self.ssdp_unicast
    }

    /// Every SOAP action received, in order.
    pub fn requests(&self) -> Vec<SoapCall> {
        self.shared.state().calls.clone()
    }

    /// The current port-mapping table (in `GetGenericPortMappingEntry` index order).
    pub fn mappings(&self) -> Vec<FakeMapping> {
        self.shared.state().table.clone()
    }
}

impl Drop for FakeIgd {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: &str, run: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.to_owned()).spawn(run)
}

fn multicast_socket(lan: Ipv4Addr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 1900)).into())?;
    socket.join_multicast_v4(&Ipv4Addr::new(239, 255, 255, 250), &lan)?;
    Ok(socket.into())
}

fn ssdp_loop(shared: &Shared, socket: &UdpSocket, reply: &UdpSocket) {
    let mut buf = [0u8; 2048];
    while !shared.stopped() {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                if let Some(answer) = ssdp_answer(&text, shared.location) {
                    let _ = reply.send_to(answer.as_bytes(), from);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// The answer to an SSDP datagram: `None` unless it is an `M-SEARCH` for one of our targets.
fn ssdp_answer(request: &str, location: SocketAddr) -> Option<String> {
    let mut lines = request.lines();
    if !lines.next()?.starts_with("M-SEARCH ") {
        return None;
    }
    let st = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("ST")
            .then_some(value.trim())
    })?;
    let st = *SEARCH_TARGETS.iter().find(|target| **target == st)?;
    // `ssdp:all` is answered for the root device, as a device answers it for each of its types.
    let st = if st == "ssdp:all" { DEVICE_TYPE } else { st };
    Some(format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=1800\r\nEXT:\r\n\
         LOCATION: http://{location}{DESC_PATH}\r\nSERVER: Linux UPnP/1.1 natpunch-testkit/{}\r\n\
         ST: {st}\r\nUSN: uuid:{UUID}::{st}\r\nContent-Length: 0\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    ))
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut connections = Vec::new();
    while !shared.stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(shared);
                connections.extend(spawn("fake-igd-conn", move || serve(&shared, stream)).ok());
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
        connections.retain(|handle: &JoinHandle<()>| !handle.is_finished());
    }
    for handle in connections {
        let _ = handle.join();
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name));
        found.map(|(_, v)| v.as_str())
    }
}

/// Answers one request on a `Connection: close` connection.
fn serve(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(CONN_DEADLINE));
    let (status, content_type, body) = match read_request(shared, &mut stream) {
        Ok(request) => route(shared, &request),
        Err(Some(status)) => (status, "text/plain", format!("{}\n", reason(status))),
        Err(None) => return,
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nServer: Linux UPnP/1.1 natpunch-testkit\r\n\r\n",
        reason(status),
        body.len()
    );
    if stream
        .write_all(format!("{head}{body}").as_bytes())
        .is_err()
    {
        return;
    }
    // Read what the client still sends before closing, so that unread input does not turn the
    // close into a reset that could destroy the answer in flight.
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sink = [0u8; 4096];
    while Instant::now() < deadline && !shared.stopped() {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            _ => {}
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

/// Reads a request; `Err(Some(status))` to answer with, `Err(None)` to hang up without one.
fn read_request(shared: &Shared, stream: &mut TcpStream) -> Result<Request, Option<u16>> {
    let deadline = Instant::now() + CONN_DEADLINE;
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut parsed = None;
    loop {
        if parsed.is_none()
            && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let (request, body_len) = parse_head(buf.get(..end).unwrap_or_default())?;
            parsed = Some((request, end + 4, body_len));
        }
        match &mut parsed {
            Some((request, start, len)) if buf.len() >= *start + *len => {
                request.body = buf.get(*start..*start + *len).unwrap_or_default().to_vec();
                return parsed.map(|(request, ..)| request).ok_or(None);
            }
            None if buf.len() > MAX_HEAD => return Err(Some(400)),
            _ if shared.stopped() => return Err(None),
            _ if Instant::now() > deadline => return Err(Some(408)),
            _ => {}
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Some(400)),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(None),
        }
    }
}

/// Parses the request line and headers; returns the request and its body length.
fn parse_head(head: &[u8]) -> Result<(Request, usize), Option<u16>> {
    let text = std::str::from_utf8(head).map_err(|_| Some(400))?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Some(400));
    };
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(Some(400));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(Some(400))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let (method, path) = (
        method.to_owned(),
        target.split('?').next().unwrap_or_default(),
    );
    let request = Request {
        method,
        path: path.to_owned(),
        headers,
        body: Vec::new(),
    };
    if request.header("Transfer-Encoding").is_some() {
        return Err(Some(400));
    }
    let body_len = request
        .header("Content-Length")
        .map_or(Ok(0), str::parse::<usize>);
    match body_len.map_err(|_| Some(400))? {
        len if len > MAX_BODY => Err(Some(413)),
        len => Ok((request, len)),
    }
}

fn route(shared: &Shared, request: &Request) -> (u16, &'static str, String) {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", DESC_PATH) => (200, XML, device_description()),
        ("GET", SCPD_PATH) => (200, XML, service_description()),
        ("POST", CONTROL_PATH) => soap(shared, request),
        _ => (404, "text/plain", "Not Found\n".to_owned()),
    }
}

fn device_description() -> String {
    let device = |kind: &str, inner: &str| {
        format!(
            "<device><deviceType>urn:schemas-upnp-org:device:{kind}:1</deviceType>\
             <friendlyName>natpunch fake {kind}</friendlyName><manufacturer>natpunch testkit\
             </manufacturer><modelName>FakeIgd</modelName><UDN>uuid:{UUID}</UDN>{inner}</device>"
        )
    };
    let service = format!(
        "<serviceList><service><serviceType>{SERVICE_TYPE}</serviceType>\
         <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>{SCPD_PATH}</SCPDURL>\
         <controlURL>{CONTROL_PATH}</controlURL><eventSubURL>/events/wanipconn</eventSubURL>\
         </service></serviceList>"
    );
    let connection = device("WANConnectionDevice", &service);
    let wan = device(
        "WANDevice",
        &format!("<deviceList>{connection}</deviceList>"),
    );
    let root = device(
        "InternetGatewayDevice",
        &format!("<deviceList>{wan}</deviceList>"),
    );
    format!(
        "<?xml version=\"1.0\"?>\n<root xmlns=\"urn:schemas-upnp-org:device-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion>{root}</root>\n"
    )
}

fn service_description() -> String {
    let mut actions = String::new();
    for (name, inputs, outputs) in ACTIONS {
        let _ = write!(actions, "<action><name>{name}</name><argumentList>");
        let args = inputs.iter().map(|a| (a, "in"));
        for (arg, direction) in args.chain(outputs.iter().map(|a| (a, "out"))) {
            let _ = write!(
                actions,
                "<argument><name>{arg}</name><direction>{direction}</direction></argument>"
            );
        }
        actions.push_str("</argumentList></action>");
    }
    format!(
        "<?xml version=\"1.0\"?>\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\">\
         <specVersion><major>1</major><minor>0</minor></specVersion>\
         <actionList>{actions}</actionList></scpd>\n"
    )
}

fn soap(shared: &Shared, request: &Request) -> (u16, &'static str, String) {
    let body = String::from_utf8_lossy(&request.body);
    let header = request.header("SOAPAction").map(|v| v.trim_matches('"'));
    let action = match header.and_then(|v| v.rsplit_once('#')) {
        Some((_, action)) => action.to_owned(),
        None => body_action(&body).unwrap_or_default().to_owned(),
    };
    let inputs = ACTIONS
        .iter()
        .find(|(name, ..)| *name == action)
        .map_or(&[][..], |a| a.1);
    let args: Vec<_> = inputs
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), element(&body, name)?)))
        .collect();
    let mut state = shared.state();
    let outcome = perform(&shared.config, &mut state.table, &action, &args);
    let error_code = outcome.as_ref().err().map(|(code, _)| *code);
    state.calls.push(SoapCall {
        action: action.clone(),
        args,
        error_code,
    });
    drop(state);
    let inner = match outcome {
        Ok(values) => {
            let mut out = String::new();
            for (name, value) in values {
                let _ = write!(out, "<{name}>{}</{name}>", escape(&value));
            }
            format!("<u:{action}Response xmlns:u=\"{SERVICE_TYPE}\">{out}</u:{action}Response>")
        }
        Err((code, description)) => format!(
            "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>\
             <detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\">\
             <errorCode>{code}</errorCode><errorDescription>{description}</errorDescription>\
             </UPnPError></detail></s:Fault>"
        ),
    };
    let envelope = format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>{inner}</s:Body>\
         </s:Envelope>\n"
    );
    (if error_code.is_some() { 500 } else { 200 }, XML, envelope)
}

/// The local name of the first element inside the SOAP `Body`.
fn body_action(body: &str) -> Option<&str> {
    let (_, element) = body.split_once("Body")?.1.split_once('<')?;
    let name = element
        .split(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .next()?;
    name.rsplit(':').next()
}

/// The unescaped text of the first `<name>text</name>` in `body`.
fn element(body: &str, name: &str) -> Option<String> {
    let (_, rest) = body.split_once(&format!("<{name}>"))?;
    Some(unescape(rest.split_once(&format!("</{name}>"))?.0))
}

const ENTITIES: [(&str, &str); 5] = [
    ("&", "&amp;"),
    ("<", "&lt;"),
    (">", "&gt;"),
    ("\"", "&quot;"),
    ("'", "&apos;"),
];

fn escape(text: &str) -> String {
    ENTITIES
        .iter()
        .fold(text.to_owned(), |text, (raw, entity)| {
            text.replace(raw, entity)
        })
}

fn unescape(text: &str) -> String {
    ENTITIES
        .iter()
        .rev()
        .fold(text.to_owned(), |text, (raw, entity)| {
            text.replace(entity, raw)
        })
}

type Outcome = Result<Vec<(&'static str, String)>, (u16, &'static str)>;

/// Executes one action on the table: the output arguments, or a UPnP error.
fn perform(
    config: &FakeIgdConfig,
    table: &mut Vec<FakeMapping>,
    action: &str,
    args: &[(String, String)],
) -> Outcome {
    let arg = |name: &str| {
        args.iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.trim())
    };
    let port = |name: &str| {
        arg(name)
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(INVALID_ARGS)
    };
    let protocol = arg("NewProtocol").to_ascii_uppercase();
    let protocol = ["UDP", "TCP"]
        .contains(&protocol.as_str())
        .then_some(protocol);
    match action {
        "GetExternalIPAddress" => Ok(vec![(
            "NewExternalIPAddress",
            config.external_ip.to_string(),
        )]),
        "AddPortMapping" | "AddAnyPortMapping" => {
            let lease = arg("NewLeaseDuration");
            let mut new = FakeMapping {
                protocol: protocol.ok_or(INVALID_ARGS)?,
                external_port: port("NewExternalPort")?,
                internal_client: arg("NewInternalClient").to_owned(),
                internal_port: port("NewInternalPort")?,
                lease_secs: if lease.is_empty() {
                    0
                } else {
                    lease.parse().map_err(|_| INVALID_ARGS)?
                },
                description: arg("NewPortMappingDescription").to_owned(),
            };
            if new.internal_client.is_empty() {
                return Err(INVALID_ARGS);
            } else if config.only_permanent_leases && new.lease_secs != 0 {
                return Err((725, "OnlyPermanentLeasesSupported"));
            }
            // A port is free for this client unless another client holds it.
            let free = |p: &u16| {
                let other = |m: &FakeMapping| m.internal_client != new.internal_client;
                !table
                    .iter()
                    .any(|m| m.protocol == new.protocol && m.external_port == *p && other(m))
            };
            let wanted = new.external_port;
            let any = action == "AddAnyPortMapping";
            new.external_port = match (wanted..=u16::MAX).chain(1..wanted).find(free) {
                Some(port) if any || port == wanted => port,
                None if any => return Err((728, "NoPortsAvailable")),
                _ => return Err((718, "ConflictInMappingEntry")),
            };
            let reserved = new.external_port.to_string();
            table.retain(|m| m.protocol != new.protocol || m.external_port != new.external_port);
            table.push(new);
            Ok(if any {
                vec![("NewReservedPort", reserved)]
            } else {
                Vec::new()
            })
        }
        "DeletePortMapping" => {
            let (protocol, port) = (protocol.ok_or(INVALID_ARGS)?, port("NewExternalPort")?);
            let index = table
                .iter()
                .position(|m| m.protocol == protocol && m.external_port == port);
            table.remove(index.ok_or((714, "NoSuchEntryInArray"))?);
            Ok(Vec::new())
        }
        "GetGenericPortMappingEntry" => {
            let index = arg("NewPortMappingIndex")
                .parse::<usize>()
                .map_err(|_| INVALID_ARGS)?;
            let m = table
                .get(index)
                .ok_or((713, "SpecifiedArrayIndexInvalid"))?;
            let values = [
                String::new(),
                m.external_port.to_string(),
                m.protocol.clone(),
                m.internal_port.to_string(),
                m.internal_client.clone(),
                "1".to_owned(),
                m.description.clone(),
                m.lease_secs.to_string(),
            ];
            Ok(MAPPING_ARGS.into_iter().zip(values).collect())
        }
        _ => Err((401, "Invalid Action")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use igd_next::{PortMappingProtocol::UDP, SearchOptions, aio::tokio::search_gateway};
    use std::net::IpAddr;

    fn start() -> FakeIgd {
        let config = FakeIgdConfig {
            lan_ip: Ipv4Addr::LOCALHOST,
            external_ip: Ipv4Addr::new(100, 64, 3, 7),
            only_permanent_leases: true,
            multicast_ssdp: false,
            ssdp_unicast_port: Some(0),
        };
        FakeIgd::start(config).expect("start the fake IGD")
    }

    #[tokio::test]
    async fn igd_next_discovers_and_maps() {
        let igd = start();
        let mut options = SearchOptions::default();
        options.broadcast_address = igd.ssdp_unicast_addr().expect("unicast SSDP address");
        options.bind_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        // igd-next refuses a loopback LOCATION unless it is explicitly allowed.
        options.allowed_gateway_ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        options.timeout = Some(Duration::from_secs(5));
        let gateway = search_gateway(options).await.expect("discovery");
        assert_eq!(gateway.addr, igd.location());
        let ip = gateway.get_external_ip().await.expect("external address");
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::new(100, 64, 3, 7)));

        let local = SocketAddr::from(([192, 168, 1, 10], 4000));
        let refused = gateway.add_port(UDP, 40000, local, 600, "np").await;
        assert_eq!(format!("{refused:?}"), "Err(OnlyPermanentLeasesSupported)");
        let added = gateway.add_port(UDP, 40000, local, 0, "np & co").await;
        assert!(added.is_ok(), "{added:?}");
        let mapping = FakeMapping {
            protocol: "UDP".into(),
            external_port: 40000,
            internal_client: "192.168.1.10".into(),
            internal_port: 4000,
            lease_secs: 0,
            description: "np & co".into(),
        };
        assert_eq!(igd.mappings(), [mapping]);
        let other = SocketAddr::from(([192, 168, 1, 11], 4000));
        let conflict = gateway.add_port(UDP, 40000, other, 0, "other").await;
        assert_eq!(format!("{conflict:?}"), "Err(PortInUse)");

        let entry = gateway
            .get_generic_port_mapping_entry(0)
            .await
            .expect("entry 0");
        let seen = (
            entry.external_port,
            entry.internal_client,
            entry.internal_port,
        );
        assert_eq!(seen, (40000, "192.168.1.10".into(), 4000));
        let past = gateway.get_generic_port_mapping_entry(1).await.err();
        assert_eq!(format!("{past:?}"), "Some(SpecifiedArrayIndexInvalid)");
        assert!(gateway.remove_port(UDP, 40000).await.is_ok());
        assert!(igd.mappings().is_empty());
        let again = gateway.remove_port(UDP, 40000).await;
        assert_eq!(format!("{again:?}"), "Err(NoSuchPortMapping)");
        let refused = gateway.add_any_port(UDP, local, 600, "any").await;
        assert!(
            format!("{refused:?}").contains("ErrorCode(725"),
            "{refused:?}"
        );
        let port = gateway
            .add_any_port(UDP, local, 0, "any")
            .await
            .expect("any port");
        assert_eq!(igd.mappings().first().map(|m| m.external_port), Some(port));

        let calls = igd.requests();
        let summary: Vec<_> = calls
            .iter()
            .map(|c| (c.action.as_str(), c.error_code))
            .collect();
        let expected = [
            ("GetExternalIPAddress", None),
            ("AddPortMapping", Some(725)),
            ("AddPortMapping", None),
            ("AddPortMapping", Some(718)),
            ("GetGenericPortMappingEntry", None),
            ("GetGenericPortMappingEntry", Some(713)),
            ("DeletePortMapping", None),
            ("DeletePortMapping", Some(714)),
            ("AddAnyPortMapping", Some(725)),
            ("AddAnyPortMapping", None),
        ];
        assert_eq!(summary, expected);
        let lease = |c: &SoapCall| {
            c.args
                .iter()
                .find(|(k, _)| k == "NewLeaseDuration")
                .cloned()
        };
        let leases: Vec<_> = calls
            .get(1..3)
            .unwrap_or_default()
            .iter()
            .map(lease)
            .collect();
        let expected = ["600", "0"].map(|v| Some(("NewLeaseDuration".to_owned(), v.to_owned())));
        assert_eq!(leases, expected);
    }

    /// Sends `request` on a fresh connection and returns whatever comes back.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(request);
        let _ = stream.shutdown(Shutdown::Write);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    }

    fn post(body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST {CONTROL_PATH} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        [head.as_bytes(), body].concat()
    }

    #[test]
    fn survives_garbage() {
        let igd = start();
        let http = igd.location();
        let mut seed = 0x2545_f491_u32;
        let mut noise = |n: usize| -> Vec<u8> {
            let mut step = || {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed.to_le_bytes()[0]
            };
            (0..n).map(|_| step()).collect()
        };
        let cases: [(&[u8], &str); 6] = [
            (b"GET /rootDesc.xml HTTP/1.1\r\nHost: x", "400"),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                "413",
            ),
            (b"POST /x HTTP/1.1\r\nContent-Length: -5\r\n\r\n", "400"),
            (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", "400"),
            (&[b'a'; 40_000], "400"),
            (b"GET /nothing HTTP/1.1\r\n\r\n", "404"),
        ];
        for (request, status) in cases {
            let reply = exchange(http, request);
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
        }
        for _ in 0..20 {
            let reply = exchange(http, &noise(300));
            assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
            let reply = exchange(http, &post(&noise(300)));
            assert!(
                reply.starts_with("HTTP/1.1 500 ") && reply.contains(">401<"),
                "{reply}"
            );
        }
        let envelope = "<s:Envelope><s:Body><u:AddPortMapping><NewProtocol>UDP</NewProtocol>\
                        <NewPortMappingDescription>é&amp;ü</NewPortMappingDescription>";
        for end in 0..=envelope.len() {
            let reply = exchange(http, &post(&envelope.as_bytes()[..end]));
            assert!(reply.starts_with("HTTP/1.1 500 "), "{reply}");
        }

        let ssdp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let _ = ssdp.set_read_timeout(Some(Duration::from_millis(300)));
        let target = igd.ssdp_unicast_addr().expect("unicast SSDP address");
        let mut junk = vec![noise(500), b"M-SEARCH".to_vec(), b"\xff\xfe\r\n".to_vec()];
        junk.push(b"M-SEARCH * HTTP/1.1\r\nST: urn:nothing\r\n\r\n".to_vec());
        for datagram in junk {
            ssdp.send_to(&datagram, target).expect("send");
        }
        let mut buf = [0u8; 2048];
        assert!(ssdp.recv_from(&mut buf).is_err(), "junk was answered");
        let search = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: upnp:rootdevice\r\n\
                      MAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n";
        ssdp.send_to(search.as_bytes(), target).expect("send");
        let (n, _) = ssdp.recv_from(&mut buf).expect("an SSDP answer");
        let answer = String::from_utf8_lossy(&buf[..n]);
        let location = format!("\r\nLOCATION: http://{http}/rootDesc.xml\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains(&location) && answer.contains("\r\nST: upnp:rootdevice\r\n"));

        let soap = "<s:Envelope><s:Body><u:GetExternalIPAddress/></s:Body></s:Envelope>";
        let reply = exchange(http, &post(soap.as_bytes()));
        assert!(
            reply.starts_with("HTTP/1.1 200 OK") && reply.contains(">100.64.3.7<"),
            "{reply}"
        );
        let reply = exchange(http, b"GET /rootDesc.xml HTTP/1.1\r\n\r\n");
        assert!(
            reply.starts_with("HTTP/1.1 200 OK") && reply.contains(SERVICE_TYPE),
            "{reply}"
        );
        let recorded = igd.requests().len();
        assert_eq!(recorded, 20 + envelope.len() + 1 + 1);
    }
}

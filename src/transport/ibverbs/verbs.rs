//! A thin safe wrapper over libibverbs (through `rdma-sys`): the only code in the crate
//! that touches `rdma-sys`.
//!
//! Objects own their verbs handle and free it on drop, and hold a reference to what they
//! were made from, so that destruction order is always right (queue pairs before their
//! completion queues, memory regions before their protection domain, everything before the
//! device context):
//!
//! ```text
//! DeviceList --open--> Context --> Pd --> Mr (RAII deregistration), OwnedMr (buffer + Mr)
//!                        |          \--> Qp (RC; INIT -> RTR -> RTS, post send/recv/write/read)
//!                        \--> CompChannel --> Cq (poll, arm)
//! ```
//!
//! Posting work requests is `unsafe`: the memory named by a scatter/gather element must
//! stay valid (and, for receives and RDMA targets, unused by anyone else) until the
//! request's completion has been polled or the queue pair has been destroyed.
//!
//! libibverbs objects may be used from any thread (rdma-core serialises what needs it), so
//! the wrappers are `Send` and `Sync`; the transport uses them from one thread at a time.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_int;
use std::sync::Arc;

use rdma_sys as ffi;

use crate::error::{Error, Result};

/// `IBV_LINK_LAYER_INFINIBAND` (an anonymous enum in verbs.h, not in the bindings).
pub const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_LINK_LAYER_ETHERNET`.
pub const LINK_LAYER_ETHERNET: u8 = 2;

/// Access flags of a memory region.
pub mod access {
    /// The HCA may write it for local operations (receives, RDMA read results).
    pub const LOCAL_WRITE: u32 = 1;
    /// Peers may RDMA-write it.
    pub const REMOTE_WRITE: u32 = 2;
    /// Peers may RDMA-read it.
    pub const REMOTE_READ: u32 = 4;
}

/// `io::Error` from a verbs return code: the errno it returned (positive or negative), or
/// the thread's errno when it returned -1 / NULL.
fn verbs_err(ret: c_int) -> io::Error {
    if ret == -1 || ret == 0 {
        io::Error::last_os_error()
    } else {
        io::Error::from_raw_os_error(ret.abs())
    }
}

fn fail(what: impl Into<String>, e: io::Error) -> Error {
    Error::io(what, e)
}

/// The text libibverbs gives for a completion status (`ibv_wc_status_str`).
pub fn status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str accepts any value and returns a pointer to a static string
    // ("unknown" for values it does not know), never NULL.
    let p = unsafe { ffi::ibv_wc_status_str(status) };
    if p.is_null() {
        return format!("status {status}");
    }
    // SAFETY: p is a NUL-terminated static string owned by libibverbs.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The verbs devices of this machine, as returned by `ibv_get_device_list`.
pub struct DeviceList {
    list: *mut *mut ffi::ibv_device,
    len: usize,
}

impl DeviceList {
    /// Lists the devices. No device (no RDMA stack: `ENOSYS`; or an empty list) is an empty
    /// list, not an error.
    pub fn new() -> Result<DeviceList> {
        let mut n: c_int = 0;
        // SAFETY: n is a valid out-pointer; the returned array is freed in Drop.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::ENOENT) | Some(libc::ENODEV) | None | Some(0) => {
                    Ok(DeviceList {
                        list: std::ptr::null_mut(),
                        len: 0,
                    })
                }
                _ => Err(fail("listing verbs devices (ibv_get_device_list)", e)),
            };
        }
        Ok(DeviceList {
            list,
            len: n.max(0) as usize,
        })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn device(&self, i: usize) -> *mut ffi::ibv_device {
        // SAFETY: i < len, and list holds len valid device pointers while self lives.
        unsafe { *self.list.add(i) }
    }

    /// The name of device `i` (`mlx5_0`, `rxe0`).
    pub fn name(&self, i: usize) -> String {
        if i >= self.len {
            return String::new();
        }
        // SAFETY: the device pointer is valid while the list lives; the name is a
        // NUL-terminated string inside the device structure.
        let p = unsafe { ffi::ibv_get_device_name(self.device(i)) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: p is NUL-terminated and lives as long as the device list.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Opens device `i`. The context stays valid after the list is dropped.
    pub fn open(&self, i: usize) -> Result<Context> {
        if i >= self.len {
            return Err(Error::invalid(
                "open",
                "device",
                format!("index {i} of {}", self.len),
            ));
        }
        let name = self.name(i);
        // SAFETY: the device pointer comes from the live list.
        let ctx = unsafe { ffi::ibv_open_device(self.device(i)) };
        if ctx.is_null() {
            return Err(fail(
                format!("opening verbs device {name}"),
                io::Error::last_os_error(),
            ));
        }
        Ok(Context(Arc::new(CtxInner { ctx, name })))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if !self.list.is_null() {
            // SAFETY: list came from ibv_get_device_list and is freed once.
            unsafe { ffi::ibv_free_device_list(self.list) };
        }
    }
}

struct CtxInner {
    ctx: *mut ffi::ibv_context,
    name: String,
}

// SAFETY: a verbs context may be used from any thread (libibverbs is thread-safe).
unsafe impl Send for CtxInner {}
// SAFETY: as above; no Rust-side state is mutated through shared references.
unsafe impl Sync for CtxInner {}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // SAFETY: every object made from the context holds an Arc to it, so none is left.
        unsafe { ffi::ibv_close_device(self.ctx) };
    }
}

/// An open device.
#[derive(Clone)]
pub struct Context(Arc<CtxInner>);

/// What the transport needs of a port's attributes.
#[derive(Clone, Copy, Debug)]
pub struct PortAttr {
    /// `IBV_PORT_ACTIVE` is 4.
    pub active: bool,
    /// Active MTU (enum value 1..5).
    pub active_mtu: u8,
    /// Local identifier.
    pub lid: u16,
    /// [`LINK_LAYER_INFINIBAND`] or [`LINK_LAYER_ETHERNET`] (0: unspecified, i.e. IB).
    pub link_layer: u8,
    /// Entries in the GID table.
    pub gid_table_len: i32,
    /// Largest message the port sends.
    pub max_msg_size: u32,
}

/// What the transport needs of a device's attributes.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAttr {
    /// Number of ports.
    pub ports: u8,
    /// Most work requests per queue.
    pub max_qp_wr: i32,
    /// Most entries per completion queue.
    pub max_cqe: i32,
}

impl Context {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Queries the device.
    pub fn query_device(&self) -> Result<DeviceAttr> {
        // SAFETY: ibv_device_attr is plain data; all-zero is a valid value.
        let mut attr: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; attr is a valid out-pointer.
        let ret = unsafe { ffi::ibv_query_device(self.0.ctx, &mut attr) };
        if ret != 0 {
            return Err(fail(
                format!("querying device {}", self.0.name),
                verbs_err(ret),
            ));
        }
        Ok(DeviceAttr {
            ports: attr.phys_port_cnt,
            max_qp_wr: attr.max_qp_wr,
            max_cqe: attr.max_cqe,
        })
    }

    /// Queries port `port` (1-based).
    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        // SAFETY: ibv_port_attr is plain data; all-zero is a valid value.
        let mut attr: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; attr is a valid out-pointer of the full (new) size,
        // which ___ibv_query_port passes to the provider.
        let ret = unsafe { ffi::___ibv_query_port(self.0.ctx, port, &mut attr) };
        if ret != 0 {
            return Err(fail(
                format!("querying port {port} of {}", self.0.name),
                verbs_err(ret),
            ));
        }
        Ok(PortAttr {
            active: attr.state == ffi::ibv_port_state::IBV_PORT_ACTIVE,
            active_mtu: attr.active_mtu as u8,
            lid: attr.lid,
            link_layer: attr.link_layer,
            gid_table_len: attr.gid_tbl_len,
            max_msg_size: attr.max_msg_sz,
        })
    }

    /// GID `index` of `port`.
    pub fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16]> {
        let mut gid = ffi::ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open; gid is a valid out-pointer.
        let ret = unsafe { ffi::ibv_query_gid(self.0.ctx, port, index as c_int, &mut gid) };
        if ret != 0 {
            return Err(fail(
                format!("querying GID {index} of port {port} of {}", self.0.name),
                verbs_err(ret),
            ));
        }
        // SAFETY: both union members are plain bytes; raw covers all 16.
        Ok(unsafe { gid.raw })
    }

    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<Pd> {
        // SAFETY: the context is open.
        let pd = unsafe { ffi::ibv_alloc_pd(self.0.ctx) };
        if pd.is_null() {
            return Err(fail(
                format!("allocating a protection domain on {}", self.0.name),
                io::Error::last_os_error(),
            ));
        }
        Ok(Pd(Arc::new(PdInner {
            pd,
            _ctx: self.clone(),
        })))
    }

    /// Creates a completion channel (an fd that becomes readable on completion events).
    pub fn comp_channel(&self) -> Result<CompChannel> {
        // SAFETY: the context is open.
        let ch = unsafe { ffi::ibv_create_comp_channel(self.0.ctx) };
        if ch.is_null() {
            return Err(fail(
                format!("creating a completion channel on {}", self.0.name),
                io::Error::last_os_error(),
            ));
        }
        let chan = CompChannel(Arc::new(ChanInner {
            ch,
            _ctx: self.clone(),
        }));
        // Non-blocking, so that get_event never blocks the progress loop.
        let fd = chan.fd();
        // SAFETY: fd is the channel's open descriptor; F_GETFL/F_SETFL only change flags.
        let ok = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(fail(
                "making the completion channel non-blocking",
                io::Error::last_os_error(),
            ));
        }
        Ok(chan)
    }

    /// Creates a completion queue of at least `entries` entries, reporting events on
    /// `channel` when armed.
    pub fn create_cq(&self, entries: i32, channel: Option<&CompChannel>) -> Result<Cq> {
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.0.ch);
        // SAFETY: the context is open; ch is null or a live channel of this context (kept
        // alive by the Cq's reference).
        let cq = unsafe { ffi::ibv_create_cq(self.0.ctx, entries, std::ptr::null_mut(), ch, 0) };
        if cq.is_null() {
            return Err(fail(
                format!(
                    "creating a completion queue of {entries} entries on {}",
                    self.0.name
                ),
                io::Error::last_os_error(),
            ));
        }
        Ok(Cq(Arc::new(CqInner {
            cq,
            channel: channel.cloned(),
            unacked: std::sync::atomic::AtomicU32::new(0),
            _ctx: self.clone(),
        })))
    }
}

struct PdInner {
    pd: *mut ffi::ibv_pd,
    _ctx: Context,
}

// SAFETY: see CtxInner.
unsafe impl Send for PdInner {}
// SAFETY: see CtxInner.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of the PD holds an Arc to it, so none is left.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

/// A protection domain.
#[derive(Clone)]
pub struct Pd(Arc<PdInner>);

impl Pd {
    /// Registers `len` bytes at `addr` with `access` flags ([`access`]).
    ///
    /// # Safety
    /// The memory must stay mapped while the region lives, and whatever the flags let the
    /// HCA write (local write, remote write) must only be written through the work
    /// requests that the caller posts while it owns the memory (the transport contract's
    /// borrowing rules).
    pub unsafe fn register(&self, addr: *mut u8, len: usize, access: u32) -> Result<Mr> {
        // SAFETY: the PD is live; the caller guarantees the range is mapped.
        let mr = unsafe { ffi::ibv_reg_mr(self.0.pd, addr.cast(), len.max(1), access as c_int) };
        if mr.is_null() {
            return Err(fail(
                format!(
                    "registering {len} bytes at {addr:p} (ibv_reg_mr; check `ulimit -l`, the \
                     locked-memory limit)"
                ),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: mr is a valid region just returned.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Mr {
            mr,
            addr: addr as usize,
            len,
            lkey,
            rkey,
            _pd: self.clone(),
        })
    }

    /// Allocates `len` bytes (page-aligned, zeroed) and registers them with `access`.
    pub fn alloc_registered(&self, len: usize, access: u32) -> Result<OwnedMr> {
        let buf = PageBuf::new(len.max(1))?;
        // SAFETY: buf's memory is owned by the OwnedMr together with the region, and is
        // only dropped after it (field order); only this wrapper's users write it.
        let mr = unsafe { self.register(buf.ptr, len.max(1), access)? };
        Ok(OwnedMr { mr, buf })
    }
}

/// A registered memory region; deregistered on drop.
pub struct Mr {
    mr: *mut ffi::ibv_mr,
    addr: usize,
    len: usize,
    lkey: u32,
    rkey: u32,
    _pd: Pd,
}

// SAFETY: see CtxInner; the region handle is only passed to verbs calls.
unsafe impl Send for Mr {}
// SAFETY: see CtxInner.
unsafe impl Sync for Mr {}

impl Mr {
    /// Local key (for scatter/gather elements).
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    /// Remote key (for peers' RDMA).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr and is deregistered once.
        let ret = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if ret != 0 {
            tracing::warn!(
                "deregistering {} bytes at {:#x} failed: {}",
                self.len,
                self.addr,
                verbs_err(ret)
            );
        }
    }
}

/// Page-aligned zeroed memory from mmap.
struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

impl PageBuf {
    fn new(len: usize) -> Result<PageBuf> {
        // SAFETY: an anonymous private mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(fail(
                format!("allocating {len} bytes of buffers"),
                io::Error::last_os_error(),
            ));
        }
        Ok(PageBuf { ptr: p.cast(), len })
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in new, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A buffer this process owns, registered. Field order drops the region first.
pub struct OwnedMr {
    mr: Mr,
    buf: PageBuf,
}

// SAFETY: the buffer is owned memory; see Mr.
unsafe impl Send for OwnedMr {}
// SAFETY: shared access only hands out raw addresses; writes go through &mut or the HCA.
unsafe impl Sync for OwnedMr {}

impl OwnedMr {
    /// The region.
    pub fn mr(&self) -> &Mr {
        &self.mr
    }
    /// Start of the buffer.
    pub fn ptr(&self) -> *mut u8 {
        self.buf.ptr
    }
    /// Bytes `off..off+len` (panics if out of range: a bug of the caller, not input).
    ///
    /// # Safety
    /// No posted work request may be writing that range now.
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.buf.len));
        // SAFETY: in range of the owned mapping; the caller excludes concurrent HCA writes.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.add(off), len) }
    }
    /// Bytes `off..off+len`, writable.
    ///
    /// # Safety
    /// No posted work request may be reading or writing that range now.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.buf.len));
        // SAFETY: in range; the caller guarantees exclusive use of the range.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.add(off), len) }
    }
    /// A scatter/gather element for `off..off+len`.
    pub fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            addr: self.buf.ptr as u64 + off as u64,
            len: len as u32,
            lkey: self.mr.lkey,
        }
    }
}

struct ChanInner {
    ch: *mut ffi::ibv_comp_channel,
    _ctx: Context,
}

// SAFETY: see CtxInner.
unsafe impl Send for ChanInner {}
// SAFETY: see CtxInner.
unsafe impl Sync for ChanInner {}

impl Drop for ChanInner {
    fn drop(&mut self) {
        // SAFETY: every CQ using the channel holds an Arc to it, so none is left.
        unsafe { ffi::ibv_destroy_comp_channel(self.ch) };
    }
}

/// A completion channel: its fd becomes readable when an armed CQ gets a completion.
#[derive(Clone)]
pub struct CompChannel(Arc<ChanInner>);

impl CompChannel {
    /// The file descriptor to poll.
    pub fn fd(&self) -> c_int {
        // SAFETY: the channel is live; fd is a plain field.
        unsafe { (*self.0.ch).fd }
    }

    /// Takes one pending completion event without blocking; returns whether there was one.
    /// The event is acknowledged on `cq` (in batches).
    pub fn get_event(&self, cq: &Cq) -> Result<bool> {
        let mut ev_cq: *mut ffi::ibv_cq = std::ptr::null_mut();
        let mut ev_ctx: *mut std::os::raw::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; out-pointers are valid.
        let ret = unsafe { ffi::ibv_get_cq_event(self.0.ch, &mut ev_cq, &mut ev_ctx) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(fail("reading a completion event (ibv_get_cq_event)", e));
        }
        if ev_cq == cq.0.cq {
            cq.count_event();
        } else if !ev_cq.is_null() {
            // One channel per CQ here; an event of another CQ is acknowledged at once.
            // SAFETY: ev_cq is a live CQ that reported this event.
            unsafe { ffi::ibv_ack_cq_events(ev_cq, 1) };
        }
        Ok(true)
    }
}

struct CqInner {
    cq: *mut ffi::ibv_cq,
    channel: Option<CompChannel>,
    unacked: std::sync::atomic::AtomicU32,
    _ctx: Context,
}

// SAFETY: see CtxInner.
unsafe impl Send for CqInner {}
// SAFETY: see CtxInner; `unacked` is atomic.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        let n = *self.unacked.get_mut();
        // SAFETY: every event taken from the channel for this CQ is acknowledged before it
        // is destroyed (ibv_destroy_cq waits for that); QPs using it hold an Arc, so none
        // is left.
        unsafe {
            if n > 0 {
                ffi::ibv_ack_cq_events(self.cq, n);
            }
            ffi::ibv_destroy_cq(self.cq);
        }
        drop(self.channel.take());
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct Cq(Arc<CqInner>);

/// A work completion, copied out of the CQ.
#[derive(Clone, Copy, Debug)]
pub struct Wc {
    /// The id given when posting.
    pub wr_id: u64,
    /// 0 on success (`IBV_WC_SUCCESS`).
    pub status: u32,
    /// `ibv_wc_opcode` value.
    pub opcode: u32,
    /// Bytes received (receives).
    pub byte_len: u32,
    /// Immediate data (host order), if the completion carries it.
    pub imm: Option<u32>,
    /// Vendor error code.
    pub vendor_err: u32,
}

impl Wc {
    /// Whether the request succeeded.
    pub fn ok(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_SUCCESS
    }
    /// Whether the request was flushed because its queue pair went to the error state.
    pub fn flushed(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }
    /// Whether it is the completion of a receive consumed by an RDMA write with immediate.
    pub fn is_write_imm(&self) -> bool {
        self.opcode == ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM
    }
    /// Whether it is a receive completion (of a SEND or a write with immediate).
    pub fn is_recv(&self) -> bool {
        self.opcode & ffi::ibv_wc_opcode::IBV_WC_RECV != 0
    }
    /// `ibv_wc_status_str` of the status, with the vendor error.
    pub fn describe(&self) -> String {
        format!(
            "{} (status {}, vendor error {:#x})",
            status_str(self.status),
            self.status,
            self.vendor_err
        )
    }
}

impl Cq {
    /// Polls up to `max` completions (at most 32 per call) and appends them to `out`;
    /// returns how many.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> Result<usize> {
        const BATCH: usize = 32;
        // SAFETY: ibv_wc is plain data; all-zero is valid.
        let mut wcs: [ffi::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let want = max.min(BATCH) as c_int;
        // SAFETY: the CQ is live; wcs has room for `want` entries.
        let n = unsafe { ffi::ibv_poll_cq(self.0.cq, want, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(fail("polling a completion queue", verbs_err(n)));
        }
        for wc in &wcs[..n as usize] {
            let has_imm = wc.wc_flags & ffi::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Wc {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate data (network
                // order).
                imm: has_imm
                    .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
                vendor_err: wc.vendor_err,
            });
        }
        Ok(n as usize)
    }

    /// Arms the CQ: the next completion raises an event on its channel.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: the CQ is live.
        let ret = unsafe { ffi::ibv_req_notify_cq(self.0.cq, 0) };
        if ret != 0 {
            return Err(fail("arming a completion queue", verbs_err(ret)));
        }
        Ok(())
    }

    fn count_event(&self) {
        use std::sync::atomic::Ordering;
        let n = self.0.unacked.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= 64 {
            self.0.unacked.fetch_sub(n, Ordering::Relaxed);
            // SAFETY: n events of this CQ were taken from its channel and not yet acked.
            unsafe { ffi::ibv_ack_cq_events(self.0.cq, n) };
        }
    }
}

/// A scatter/gather element: registered memory for one work request.
#[derive(Clone, Copy, Debug)]
pub struct Sge {
    /// Address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Local key of the region containing it.
    pub lkey: u32,
}

/// What a send-queue work request does.
#[derive(Clone, Copy, Debug)]
pub enum SendOp {
    /// SEND: consumes a receive at the peer.
    Send,
    /// RDMA write into the peer's memory; no completion there.
    Write {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// RDMA write with immediate data: consumes a receive at the peer, which completes with
    /// `imm`.
    WriteImm {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// Immediate data (host order).
        imm: u32,
    },
    /// RDMA read from the peer's memory into the local elements.
    Read {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
    },
}

/// Capacities of a queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    /// Send queue depth.
    pub send_wr: u32,
    /// Receive queue depth.
    pub recv_wr: u32,
    /// Inline bytes per send.
    pub max_inline: u32,
}

/// The remote end of a connection, for [`Qp::connect`].
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    /// Its queue pair number.
    pub qpn: u32,
    /// Its initial packet sequence number.
    pub psn: u32,
    /// Its LID (InfiniBand).
    pub lid: u16,
    /// Its GID.
    pub gid: [u8; 16],
    /// Whether to use a global route header (RoCE always; IB across subnets).
    pub global: bool,
    /// Path MTU to use (enum 1..5).
    pub mtu: u8,
}

struct QpInner {
    qp: *mut ffi::ibv_qp,
    _send_cq: Cq,
    _recv_cq: Cq,
    _pd: Pd,
}

// SAFETY: see CtxInner.
unsafe impl Send for QpInner {}
// SAFETY: see CtxInner.
unsafe impl Sync for QpInner {}

impl Drop for QpInner {
    fn drop(&mut self) {
        // SAFETY: qp came from ibv_create_qp; destroyed once, before its CQs and PD (held).
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

/// A reliable-connected queue pair.
pub struct Qp {
    inner: QpInner,
    caps: QpCaps,
    port: u8,
    gid_index: u8,
    psn: u32,
}

impl Qp {
    /// Creates an RC queue pair on `pd` with completions on `send_cq`/`recv_cq`, asking
    /// for `caps` (the device may grant more; with inline data refused it retries without)
    /// and brings it to INIT on `port` with local write, remote write and remote read
    /// allowed. `gid_index` and `psn` are used by [`Qp::connect`].
    pub fn new_rc(
        pd: &Pd,
        send_cq: &Cq,
        recv_cq: &Cq,
        caps: QpCaps,
        port: u8,
        gid_index: u8,
        psn: u32,
    ) -> Result<Qp> {
        let mut inline = caps.max_inline;
        let qp = loop {
            // SAFETY: ibv_qp_init_attr is plain data; all-zero is valid.
            let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            init.send_cq = send_cq.0.cq;
            init.recv_cq = recv_cq.0.cq;
            init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
            init.sq_sig_all = 0;
            init.cap.max_send_wr = caps.send_wr;
            init.cap.max_recv_wr = caps.recv_wr;
            init.cap.max_send_sge = 2;
            init.cap.max_recv_sge = 1;
            init.cap.max_inline_data = inline;
            // SAFETY: the PD and CQs are live (and kept alive by the Qp); init is valid.
            let qp = unsafe { ffi::ibv_create_qp(pd.0.pd, &mut init) };
            if !qp.is_null() {
                inline = init.cap.max_inline_data;
                break qp;
            }
            let e = io::Error::last_os_error();
            if inline > 0 {
                tracing::debug!(
                    "creating a QP with {inline} inline bytes failed ({e}); retrying without"
                );
                inline = if inline > 64 { 64 } else { 0 };
                continue;
            }
            return Err(fail(
                format!(
                    "creating an RC queue pair ({} send, {} receive entries)",
                    caps.send_wr, caps.recv_wr
                ),
                e,
            ));
        };
        let q = Qp {
            inner: QpInner {
                qp,
                _send_cq: send_cq.clone(),
                _recv_cq: recv_cq.clone(),
                _pd: pd.clone(),
            },
            caps: QpCaps {
                max_inline: inline,
                ..caps
            },
            port,
            gid_index,
            psn: psn & 0xff_ffff,
        };
        // SAFETY: ibv_qp_attr is plain data; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ;
        use ffi::ibv_qp_attr_mask as M;
        q.modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )?;
        Ok(q)
    }

    fn modify(
        &self,
        a: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        to: &str,
    ) -> Result<()> {
        // SAFETY: the QP is live; a is a valid attribute structure for the mask.
        let ret = unsafe { ffi::ibv_modify_qp(self.inner.qp, a, mask.0 as c_int) };
        if ret != 0 {
            return Err(fail(
                format!("moving queue pair {} to {to}", self.qpn()),
                verbs_err(ret),
            ));
        }
        Ok(())
    }

    /// Its number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; qp_num is a plain field.
        unsafe { (*self.inner.qp).qp_num }
    }

    /// Its initial packet sequence number.
    pub fn psn(&self) -> u32 {
        self.psn
    }

    /// The capacities granted.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// INIT -> RTR -> RTS towards `remote`. Receives should be posted before, since the
    /// peer may send as soon as it is in RTS.
    pub fn connect(&self, remote: &Remote) -> Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: ibv_qp_attr is plain data; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = remote.mtu as ffi::ibv_mtu::Type;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn & 0xff_ffff;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.port;
        if remote.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = self.gid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = 0;
            a.ah_attr.grh.flow_label = 0;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        // SAFETY: as above.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        // 4.096 us * 2^14 = 67 ms per try, 7 tries: a dead peer fails requests in ~0.5 s.
        a.timeout = 14;
        a.retry_cnt = 7;
        // Credits mean the receiver is never out of buffers; retry forever if it is.
        a.rnr_retry = 7;
        a.sq_psn = self.psn;
        a.max_rd_atomic = 1;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Moves the queue pair to the error state: outstanding requests complete as flushed,
    /// nothing more is sent or accepted.
    pub fn to_error(&self) -> Result<()> {
        // SAFETY: as above.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE, "ERR")
    }

    /// Posts a receive of one element.
    ///
    /// # Safety
    /// `sge` must name registered memory that stays valid and unused by anyone else until
    /// the receive's completion is polled (or the queue pair is destroyed).
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<()> {
        let mut s = ffi::ibv_sge {
            addr: sge.addr,
            length: sge.len,
            lkey: sge.lkey,
        };
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut s,
            num_sge: 1,
        };
        let mut bad: *mut ffi::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; wr and s live across the call (the provider copies them
        // into the queue); the memory's validity is the caller's contract.
        let ret = unsafe {
            let ctx = (*self.inner.qp).context;
            match (*ctx).ops.post_recv {
                Some(f) => f(self.inner.qp, &mut wr, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if ret != 0 {
            return Err(fail(
                format!("posting a receive on queue pair {}", self.qpn()),
                verbs_err(ret),
            ));
        }
        Ok(())
    }

    /// Posts one send-queue request over `sges` (at most 2), signalled (it produces a
    /// completion). With `inline`, the data is copied into the request at post time and
    /// the elements' memory need not be registered (nor stay valid after the call).
    ///
    /// # Safety
    /// Unless `inline`, the elements must name registered memory that stays valid (and for
    /// [`SendOp::Read`], unused by anyone else) until the completion is polled or the queue
    /// pair is destroyed; the remote address and key must be ones the peer granted.
    pub unsafe fn post_send(
        &self,
        wr_id: u64,
        sges: &[Sge],
        op: SendOp,
        inline: bool,
    ) -> Result<()> {
        let mut list = [ffi::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; 2];
        let n = sges.len().min(2);
        for (d, s) in list.iter_mut().zip(sges) {
            *d = ffi::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            };
        }
        // SAFETY: ibv_send_wr is plain data (pointers and integers); all-zero is valid.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = if n == 0 {
            std::ptr::null_mut()
        } else {
            list.as_mut_ptr()
        };
        wr.num_sge = n as c_int;
        let mut flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        if inline {
            flags |= ffi::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        match op {
            SendOp::Send => wr.opcode = ffi::ibv_wr_opcode::IBV_WR_SEND,
            SendOp::Write { addr, rkey } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = ffi::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            SendOp::WriteImm { addr, rkey, imm } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                wr.wr.rdma = ffi::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            SendOp::Read { addr, rkey } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = ffi::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
        }
        let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; wr and list live across the call (the provider copies
        // them, and inline data, into the queue); memory validity is the caller's contract.
        let ret = unsafe {
            let ctx = (*self.inner.qp).context;
            match (*ctx).ops.post_send {
                Some(f) => f(self.inner.qp, &mut wr, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if ret != 0 {
            return Err(fail(
                format!("posting a send request on queue pair {}", self.qpn()),
                verbs_err(ret),
            ));
        }
        Ok(())
    }
}

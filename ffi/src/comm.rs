//! Communicator handles: init, free, finalize, queries, dup, abort, barrier.

use std::ffi::{CStr, c_char};
use std::ptr;
use std::sync::Arc;

use ferrocomm_rs::comm::AbortHandle;
use ferrocomm_rs::{Communicator, Error, InitOptions};
use parking_lot::Mutex;

use crate::error::{Fail, boundary, ferrocomm_result};
use crate::handle::{self, Kind, Object};
use crate::types::{out_ptr, put};

/// A communicator: a group of ranks that exchange messages (`MPI_Comm`, `ncclComm_t`). An
/// opaque handle; see `ferrocomm_init` and `ferrocomm_comm_free`.
#[allow(non_camel_case_types)]
pub struct ferrocomm_comm_t {
    _opaque: [u8; 0],
}

/// What a communicator handle refers to.
pub(crate) struct CommCell {
    /// One thread at a time (the Rust `Communicator` is `Send`, not `Sync`): a second
    /// thread gets `FERROCOMM_ERR_BUSY` instead of waiting.
    comm: Mutex<Communicator>,
    /// Aborting needs no lock, so it works while another thread is blocked in a call.
    abort: AbortHandle,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    node_index: usize,
}

impl CommCell {
    pub(crate) fn new(comm: Communicator) -> CommCell {
        CommCell {
            abort: comm.abort_handle(),
            rank: comm.rank(),
            size: comm.size(),
            local_rank: comm.local_rank(),
            local_size: comm.local_size(),
            node_index: comm.node_index(),
            comm: Mutex::new(comm),
        }
    }
}

/// Registers `comm` and returns its handle.
pub(crate) fn register(comm: Communicator) -> *mut ferrocomm_comm_t {
    let h = handle::insert(Object::Comm(Arc::new(CommCell::new(comm))));
    ptr::without_provenance_mut(h)
}

fn cell(op: &str, comm: *mut ferrocomm_comm_t) -> Result<Arc<CommCell>, Fail> {
    match handle::get(comm.addr(), Kind::Comm) {
        Ok(Object::Comm(c)) => Ok(c),
        Ok(_) => Err(Fail::Handle(format!("{op}: not a communicator"))),
        Err(e) => Err(e),
    }
}

/// Runs `f` on the communicator of handle `comm`, or fails with `Busy` when another thread
/// is using it.
pub(crate) fn with_comm<R>(
    op: &str,
    comm: *mut ferrocomm_comm_t,
    f: impl FnOnce(&Communicator) -> Result<R, Fail>,
) -> Result<R, Fail> {
    let cell = cell(op, comm)?;
    let guard = cell.comm.try_lock().ok_or_else(|| {
        Fail::Busy(format!(
            "communicator {:#x} is in use by another thread (a communicator serves one \
             thread at a time; give each thread its own with ferrocomm_comm_dup)",
            comm.addr()
        ))
    })?;
    f(&guard)
}

/// Joins the job described by the environment and makes the world communicator: the same
/// as `ferrocomm_init_url(NULL, -1, -1, comm)`. Under `ferrorun`, `torchrun`, `srun` or
/// `mpirun` the environment says everything (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
/// ...; see the README).
///
/// Blocking: collective over the whole job; returns when every rank has joined and is
/// reachable, or fails after `FERROCOMM_TIMEOUT` seconds (default 300) naming the missing
/// ranks.
///
/// Ownership: on success `*comm` is a new handle owned by the caller; release it with
/// `ferrocomm_comm_free` (or `ferrocomm_finalize`). On failure `*comm` is set to NULL.
///
/// Errors: `INVALID_ARGUMENT` (`comm` is NULL), `CONFIG` (a malformed variable), `TIMEOUT`,
/// `JOB_MISMATCH`, `PEER_LOST`, `IO`.
///
/// # Safety
/// `comm` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_init(comm: *mut *mut ferrocomm_comm_t) -> ferrocomm_result {
    // SAFETY: forwarded contract; a NULL url is allowed.
    unsafe { ferrocomm_init_url(ptr::null(), -1, -1, comm) }
}

/// Joins a job through an init method given as a URL and makes the world communicator
/// (`torch.distributed.init_process_group`).
///
/// - `url`: `"tcp://HOST:PORT"` (rank 0 hosts the rendezvous store there), `"env://"`
///   (MASTER_ADDR, MASTER_PORT, ...) or `"file:///shared/path"`; NULL reads
///   `FERROCOMM_INIT_METHOD` and defaults to `env://`.
/// - `world_size`: number of ranks, or -1 to take it from the environment.
/// - `rank`: this process's rank in `0..world_size`, or -1 to take it from the environment
///   or have the store assign one.
///
/// Blocking, ownership and errors as `ferrocomm_init`; also:
/// - `INVALID_ARGUMENT` for a `url` that is not UTF-8, a `world_size` or `rank` below -1,
///   a `world_size` of 0, or a `rank` of at least `world_size` when both are given here;
/// - `CONFIG` for a malformed URL or environment variable, and for a rank out of range
///   when the rank or the world size comes from the environment (RANK, WORLD_SIZE, ...).
///
/// Thread safety: any thread may call it; each call makes a new world (one per process is
/// the usual case).
///
/// # Safety
/// `url` must be NULL or a NUL-terminated string; `comm` must be NULL or valid for writing
/// one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_init_url(
    url: *const c_char,
    world_size: i64,
    rank: i64,
    comm: *mut *mut ferrocomm_comm_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_init_url";
    boundary(OP, || {
        out_ptr(OP, "comm", comm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(comm, ptr::null_mut()) };
        let mut opts = InitOptions::new();
        if !url.is_null() {
            // SAFETY: a NUL-terminated string by the caller's contract.
            let s = unsafe { CStr::from_ptr(url) }
                .to_str()
                .map_err(|_| Fail::invalid(OP, "url", "not valid UTF-8"))?;
            opts = opts.init_method(s);
        }
        opts = match world_size {
            -1 => opts,
            n if n >= 0 => opts.world_size(n as usize),
            n => return Err(Fail::invalid(OP, "world_size", format!("{n} is below -1"))),
        };
        opts = match rank {
            -1 => opts,
            r if r >= 0 => opts.rank(r as usize),
            r => return Err(Fail::invalid(OP, "rank", format!("{r} is below -1"))),
        };
        if world_size == 0 {
            return Err(Fail::invalid(
                OP,
                "world_size",
                "0: a world has at least one rank (or pass -1 to take it from the environment)",
            ));
        }
        if world_size > 0 && rank >= world_size {
            return Err(Fail::invalid(
                OP,
                "rank",
                format!(
                    "{rank} is out of range for the world_size {world_size} also given (ranks \
                     are 0..{world_size})"
                ),
            ));
        }
        ferrocomm_rs::init_logging();
        // The arguments were checked above: a rank out of range now comes from the
        // environment (RANK, WORLD_SIZE, SLURM_*, OMPI_*), a setting, hence CONFIG.
        let c = opts.init().map_err(|e| match e {
            Error::InvalidArgument { arg, why, .. } if arg == "rank" => Fail::Coded(
                ferrocomm_result::FERROCOMM_ERR_CONFIG,
                format!(
                    "bad configuration: {why}; the environment's rank must be below the world \
                     size (RANK in 0..WORLD_SIZE)"
                ),
            ),
            other => Fail::from(other),
        })?;
        // SAFETY: as above.
        unsafe { put(comm, register(c)) };
        Ok(())
    })
}

/// Releases a communicator handle. Requests started on it stay valid (wait for them as
/// usual); other communicators of the same world (from `ferrocomm_comm_dup`) are not
/// affected. When the last communicator of a world is released, its connections close.
///
/// Ownership: consumes the handle; it is invalid afterwards, and freeing it again returns
/// `FERROCOMM_ERR_INVALID_HANDLE` (never a crash).
///
/// Thread safety: any thread; if another thread is inside a call on the same communicator,
/// that call finishes normally first and the communicator is released when it returns.
///
/// Blocking: non-blocking collectives started on the communicator that have not finished
/// yet are waited for (the other ranks expect them; their requests stay valid). Otherwise
/// it does not wait for other ranks (closing the connections of a world takes at most a few
/// hundred milliseconds per peer that stopped reading).
///
/// Errors: `INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_comm_free(comm: *mut ferrocomm_comm_t) -> ferrocomm_result {
    boundary("ferrocomm_comm_free", || {
        drop(handle::remove(comm.addr(), Kind::Comm)?);
        Ok(())
    })
}

/// Releases every handle the library still holds, in this order: requests (a receive that
/// matched nothing is withdrawn; a transfer in flight is waited for, up to
/// `FERROCOMM_OP_TIMEOUT`), then reducers (gradient all_reduces in flight are waited for),
/// then communicators (closing their connections). After it,
/// every old handle is invalid and the library holds no memory of its own apart from
/// what the Rust runtime keeps for the life of the process; `ferrocomm_init` may be
/// called again.
///
/// Not collective, and no barrier: ranks that finish at different times are fine, since
/// messages already sent are delivered before connections close.
///
/// Thread safety: call it when no other thread is inside a ferrocomm call (as with
/// `MPI_Finalize`); calls still running keep the objects they use alive until they return.
///
/// Errors: none (always `FERROCOMM_OK`, or `PANIC` on a bug).
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_finalize() -> ferrocomm_result {
    boundary("ferrocomm_finalize", || {
        let (reqs, rest): (Vec<Object>, Vec<Object>) = handle::drain()
            .into_iter()
            .partition(|o| matches!(o, Object::Request(_)));
        drop(reqs);
        let (reducers, comms): (Vec<Object>, Vec<Object>) = rest
            .into_iter()
            .partition(|o| matches!(o, Object::Reducer(_)));
        drop(reducers);
        drop(comms);
        Ok(())
    })
}

/// Stores `f(cell)` through `out`.
///
/// # Safety
/// `out` must be NULL or valid for writing one `size_t`.
unsafe fn query(
    op: &str,
    comm: *mut ferrocomm_comm_t,
    out: *mut usize,
    f: impl FnOnce(&CommCell) -> usize,
) -> ferrocomm_result {
    boundary(op, || {
        out_ptr(op, "out", out)?;
        let c = cell(op, comm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(out, f(&c)) };
        Ok(())
    })
}

/// Stores this process's rank in the communicator, `0..size`, in `*rank`.
///
/// Thread safety: any thread, even while another is inside a call on the communicator.
/// Does not block. Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`rank` NULL).
///
/// # Safety
/// `rank` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_rank(
    comm: *mut ferrocomm_comm_t,
    rank: *mut usize,
) -> ferrocomm_result {
    // SAFETY: forwarded contract.
    unsafe { query("ferrocomm_comm_rank", comm, rank, |c| c.rank) }
}

/// Stores the number of ranks of the communicator in `*size`. Thread safety, blocking and
/// errors as `ferrocomm_comm_rank`.
///
/// # Safety
/// `size` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_size(
    comm: *mut ferrocomm_comm_t,
    size: *mut usize,
) -> ferrocomm_result {
    // SAFETY: forwarded contract.
    unsafe { query("ferrocomm_comm_size", comm, size, |c| c.size) }
}

/// Stores this process's rank among the world's ranks on this host (by host identity, not
/// trusting LOCAL_RANK blindly), `0..local_size`, in `*local_rank`: the index of the GPU
/// or core set to use. Thread safety, blocking and errors as `ferrocomm_comm_rank`.
///
/// # Safety
/// `local_rank` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_local_rank(
    comm: *mut ferrocomm_comm_t,
    local_rank: *mut usize,
) -> ferrocomm_result {
    // SAFETY: forwarded contract.
    unsafe {
        query("ferrocomm_comm_local_rank", comm, local_rank, |c| {
            c.local_rank
        })
    }
}

/// Stores the number of the world's ranks on this host in `*local_size`. Thread safety,
/// blocking and errors as `ferrocomm_comm_rank`.
///
/// # Safety
/// `local_size` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_local_size(
    comm: *mut ferrocomm_comm_t,
    local_size: *mut usize,
) -> ferrocomm_result {
    // SAFETY: forwarded contract.
    unsafe {
        query("ferrocomm_comm_local_size", comm, local_size, |c| {
            c.local_size
        })
    }
}

/// Stores the index of this host among the job's hosts (0 for the host of rank 0) in
/// `*node`. Thread safety, blocking and errors as `ferrocomm_comm_rank`.
///
/// # Safety
/// `node` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_node_index(
    comm: *mut ferrocomm_comm_t,
    node: *mut usize,
) -> ferrocomm_result {
    // SAFETY: forwarded contract.
    unsafe { query("ferrocomm_comm_node_index", comm, node, |c| c.node_index) }
}

/// Makes a new communicator with the same ranks whose messages never mix with `comm`'s
/// (`MPI_Comm_dup`): one per thread lets threads communicate at the same time, one per
/// library keeps its messages apart.
///
/// Collective: every rank of `comm` must call it, in the same order relative to its other
/// communicator-creating calls. Sends nothing and does not block.
///
/// The dup belongs to `comm`'s world: it shares its connections, and a fatal error on
/// either (a collective mismatch on the dup, a lost peer, an abort) fails both and every
/// other communicator of the world (see `ferrocomm_result`). A dup of a failed communicator
/// is made, and fails every operation with the same error.
///
/// Ownership: `*newcomm` is a new handle owned by the caller (`ferrocomm_comm_free`); NULL
/// on failure.
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`newcomm` NULL), `BUSY`.
///
/// # Safety
/// `newcomm` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_dup(
    comm: *mut ferrocomm_comm_t,
    newcomm: *mut *mut ferrocomm_comm_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_comm_dup";
    boundary(OP, || {
        out_ptr(OP, "newcomm", newcomm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(newcomm, ptr::null_mut()) };
        let dup = with_comm(OP, comm, |c| Ok(c.dup()))?;
        // SAFETY: as above.
        unsafe { put(newcomm, register(dup)) };
        Ok(())
    })
}

/// `color` of `ferrocomm_comm_split` for a rank that joins no new communicator
/// (`MPI_UNDEFINED`).
pub const FERROCOMM_UNDEFINED: i64 = -1;

/// Splits a communicator by color (`MPI_Comm_split`): the ranks that pass the same `color`
/// (0..=UINT32_MAX) form one new communicator, numbered by `key` (ties broken by their rank
/// in `comm`); a rank that passes `FERROCOMM_UNDEFINED` gets `*newcomm` = NULL and
/// `FERROCOMM_OK`. The new communicator's messages and collectives never mix with those of
/// any other communicator.
///
/// Collective: every rank of `comm` calls it, in the same order relative to its other
/// collectives and communicator-creating calls on `comm` (it is an all_gather of colors and
/// keys). Blocking: until every rank of `comm` has called it; fails after
/// `FERROCOMM_OP_TIMEOUT`.
///
/// Ownership: `*newcomm` is a new handle owned by the caller (`ferrocomm_comm_free`); NULL
/// for `FERROCOMM_UNDEFINED` and on failure.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`newcomm` NULL, `color` neither
/// `FERROCOMM_UNDEFINED` nor in 0..=UINT32_MAX), `BUSY`, `TIMEOUT`, `PEER_LOST`,
/// `COLLECTIVE_MISMATCH`, `ABORTED`, `IO`.
///
/// # Safety
/// `newcomm` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_split(
    comm: *mut ferrocomm_comm_t,
    color: i64,
    key: i64,
    newcomm: *mut *mut ferrocomm_comm_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_comm_split";
    boundary(OP, || {
        out_ptr(OP, "newcomm", newcomm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(newcomm, ptr::null_mut()) };
        let color = match color {
            FERROCOMM_UNDEFINED => None,
            c => Some(u32::try_from(c).map_err(|_| {
                Fail::invalid(
                    OP,
                    "color",
                    format!("{c} is neither FERROCOMM_UNDEFINED (-1) nor in 0..=4294967295"),
                )
            })?),
        };
        if let Some(sub) = with_comm(OP, comm, |c| Ok(c.split(color, key)?))? {
            // SAFETY: as above.
            unsafe { put(newcomm, register(sub)) };
        }
        Ok(())
    })
}

/// Makes a communicator of the ranks `ranks[0..n]` of `comm`, numbered in the order given
/// (`MPI_Comm_create_group`, `torch.distributed.new_group`): only the listed ranks call it,
/// each with the same list, and it sends no messages.
///
/// Members must create groups of the same list in the same order (groups of different lists
/// may be created in any order). Does not block.
///
/// Ownership: `*newcomm` is a new handle owned by the caller (`ferrocomm_comm_free`); NULL on
/// failure.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`newcomm` NULL, `ranks` NULL, `n` 0, a rank
/// out of range or repeated, this rank not in the list), `BUSY`.
///
/// # Safety
/// `ranks` must point to `n` readable `size_t`; `newcomm` must be NULL or valid for writing
/// one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_create_group(
    comm: *mut ferrocomm_comm_t,
    ranks: *const usize,
    n: usize,
    newcomm: *mut *mut ferrocomm_comm_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_comm_create_group";
    boundary(OP, || {
        out_ptr(OP, "newcomm", newcomm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(newcomm, ptr::null_mut()) };
        if n > 0 && ranks.is_null() {
            return Err(Fail::invalid(OP, "ranks", format!("NULL with n = {n}")));
        }
        if n > isize::MAX as usize / std::mem::size_of::<usize>() {
            return Err(Fail::invalid(
                OP,
                "n",
                format!("{n} ranks do not fit in memory"),
            ));
        }
        let list: &[usize] = if n == 0 {
            &[]
        } else {
            // SAFETY: `n` readable entries by the caller's contract.
            unsafe { std::slice::from_raw_parts(ranks, n) }
        };
        let sub = with_comm(OP, comm, |c| Ok(c.new_group(list)?))?;
        // SAFETY: as above.
        unsafe { put(newcomm, register(sub)) };
        Ok(())
    })
}

/// Aborts every communicator of `comm`'s world (`comm`, the communicator it came from, and
/// every dup, split and group of the same `ferrocomm_init`; see `ferrocomm_result` for this
/// scope): calls blocked in any thread return `FERROCOMM_ERR_ABORTED` (with `reason` in the
/// message), and so does every later call on them, on every path (point-to-point,
/// collectives, requests), at any size, one rank included. Communicators of another world
/// are not affected. For a watchdog thread or a signal-driven shutdown; the handles still
/// need `ferrocomm_comm_free`.
///
/// Thread safety: any thread, also while another thread is blocked in a call on `comm`.
/// Does not block. `reason` may be NULL.
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`reason` not UTF-8).
///
/// # Safety
/// `reason` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_comm_abort(
    comm: *mut ferrocomm_comm_t,
    reason: *const c_char,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_comm_abort";
    boundary(OP, || {
        let c = cell(OP, comm)?;
        let why = if reason.is_null() {
            "ferrocomm_comm_abort was called"
        } else {
            // SAFETY: a NUL-terminated string by the caller's contract.
            unsafe { CStr::from_ptr(reason) }
                .to_str()
                .map_err(|_| Fail::invalid(OP, "reason", "not valid UTF-8"))?
        };
        c.abort.abort(why);
        Ok(())
    })
}

/// Waits until every rank of the communicator has called it (`MPI_Barrier`).
///
/// Blocking: collective; returns when all ranks arrived, or fails after
/// `FERROCOMM_OP_TIMEOUT`. Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `TIMEOUT`, `PEER_LOST`, `COLLECTIVE_MISMATCH`,
/// `ABORTED`, `IO`.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_barrier(comm: *mut ferrocomm_comm_t) -> ferrocomm_result {
    const OP: &str = "ferrocomm_barrier";
    boundary(OP, || with_comm(OP, comm, |c| Ok(c.barrier()?)))
}

/// Number of live communicator handles (for tests).
#[cfg(test)]
pub(crate) fn live() -> usize {
    handle::live(Kind::Comm)
}

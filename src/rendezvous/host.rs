//! Which machine is this? Host identity for local ranks and transport choice.
//!
//! Two processes are on "the same host" when they can share memory and see each other's
//! processes, which is what the shared-memory transport needs. Hostnames alone are not
//! enough: containers copy them, clusters reuse them across reboots, and our multi-host
//! tests run "hosts" as network namespaces of one machine. So the identity is
//!
//! ```text
//! HOSTNAME/BOOT_ID/NETNS_INODE
//! ```
//!
//! `BOOT_ID` is `/proc/sys/kernel/random/boot_id` (new at every boot) and `NETNS_INODE` the
//! inode of this process's network namespace (`readlink /proc/self/ns/net`), so processes in
//! different network namespaces count as different hosts. Parts that cannot be read (not
//! Linux, a restricted `/proc`) are left out. `FERROCOMM_HOST_ID`, when set and non-empty,
//! replaces the whole identity.

/// Environment variable that overrides [`host_id`].
pub const HOST_ID_ENV: &str = "FERROCOMM_HOST_ID";

/// This machine's hostname (`gethostname`), or `"unknown-host"` if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call;
    // gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast::<libc::c_char>(), buf.len()) };
    if rc != 0 {
        return "unknown-host".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
    if name.is_empty() {
        "unknown-host".to_owned()
    } else {
        name
    }
}

/// The identity of this machine for local-rank purposes (see the module docs):
/// `FERROCOMM_HOST_ID` if set, else hostname, boot id and network-namespace inode.
pub fn host_id() -> String {
    host_id_with(std::env::var(HOST_ID_ENV).ok())
}

/// [`host_id`] with the override given explicitly instead of read from the environment
/// (`None` or an empty string: detect).
pub fn host_id_with(override_id: Option<String>) -> String {
    match override_id {
        Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => detected_host_id(),
    }
}

fn detected_host_id() -> String {
    let mut id = hostname();
    if let Ok(boot) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let boot = boot.trim();
        if !boot.is_empty() {
            id.push('/');
            id.push_str(boot);
        }
    }
    if let Some(ns) = netns_inode() {
        id.push_str("/netns:");
        id.push_str(&ns);
    }
    id
}

/// The inode of this process's network namespace, from the link `net:[4026531992]`.
fn netns_inode() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/net").ok()?;
    let link = link.to_string_lossy();
    let inode = link.strip_prefix("net:[")?.strip_suffix(']')?;
    (!inode.is_empty() && inode.bytes().all(|b| b.is_ascii_digit())).then(|| inode.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_id_is_stable_and_overridable() {
        let a = host_id_with(None);
        assert_eq!(a, host_id_with(None));
        assert!(a.starts_with(&hostname()));
        assert_eq!(host_id_with(Some(" node-7 ".into())), "node-7");
        assert_eq!(host_id_with(Some(String::new())), a);
        if std::path::Path::new("/proc/self/ns/net").exists() {
            assert!(a.contains("/netns:"), "{a}");
        }
    }
}

//! Finding hotpot mounts in /proc/self/mountinfo, and unmounting them.

use std::path::{Path, PathBuf};

/// A hotpot mount: where it is and which dispatcher serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotpotMount {
    pub mount_point: PathBuf,
    pub dispatcher: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(value) = u8::from_str_radix(&code, 8) {
                out.push(value as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

pub fn hotpot_mounts() -> Vec<HotpotMount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|field| *field == "-")?;
            let fstype = fields.get(dash + 1)?;
            let source = fields.get(dash + 2)?;
            // fuser's own mount code records the type as plain "fuse"; libfuse as fuse.hotpot.
            if *fstype != "fuse" && *fstype != "fuse.hotpot" {
                return None;
            }
            Some(HotpotMount {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                dispatcher: source.strip_prefix("hotpot:")?.to_string(),
            })
        })
        .collect()
}

pub fn is_hotpot_mount(path: &Path) -> bool {
    hotpot_mounts()
        .iter()
        .any(|mount| mount.mount_point == path)
}

/// The hotpot mount holding `path` (which need not exist yet) and the path inside it.
pub fn locate(path: &Path) -> anyhow::Result<(HotpotMount, String)> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut best: Option<HotpotMount> = None;
    for mount in hotpot_mounts() {
        if absolute.starts_with(&mount.mount_point)
            && best.as_ref().is_none_or(|b| {
                mount.mount_point.as_os_str().len() > b.mount_point.as_os_str().len()
            })
        {
            best = Some(mount);
        }
    }
    let mount = best.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not inside a hotpot mount (see /proc/self/mountinfo)",
            absolute.display()
        )
    })?;
    let inside = absolute
        .strip_prefix(&mount.mount_point)
        .expect("prefix checked")
        .to_string_lossy()
        .to_string();
    Ok((mount, inside))
}

/// Unmount `path` if something is mounted there (a dead FUSE mount included); lazily, so a
/// busy mount is detached and goes when its last user does.
pub fn unmount_if_mounted(path: &Path) {
    let listed = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            line.split(' ').nth(4).map(unescape).as_deref() == Some(&*path.to_string_lossy())
        });
    if !listed {
        return;
    }
    let Ok(target) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        eprintln!(
            "warning: cannot unmount {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

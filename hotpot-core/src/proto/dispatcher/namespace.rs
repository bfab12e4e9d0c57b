//! The namespace half of the dispatcher's state: inodes, directory entries, names, renames.
//! Its rules are POSIX's: a name is at most 255 bytes, a directory moves neither into itself
//! nor over a non-empty directory, a removed file's dataset is handed back to be dropped.

use std::collections::BTreeMap;

use super::{DispatcherState, Inode};
use crate::proto::types::*;

impl DispatcherState {
    pub(super) fn inode(&self, ino: Ino) -> Result<&Inode, FsError> {
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    pub(super) fn inode_mut(&mut self, ino: Ino) -> Result<&mut Inode, FsError> {
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    pub(super) fn child(&self, parent: Ino, name: &str) -> Result<Ino, FsError> {
        let dir = self.inode(parent)?;
        if dir.attr.kind != Kind::Directory {
            return Err(FsError::NotDirectory);
        }
        dir.children.get(name).copied().ok_or(FsError::NotFound)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_child(
        &mut self,
        parent: Ino,
        name: &str,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        dataset: Option<Dataset>,
        now_ns: u64,
    ) -> Result<Attr, FsError> {
        check_name(name)?;
        let dir = self.inode(parent)?;
        if dir.attr.kind != Kind::Directory {
            return Err(FsError::NotDirectory);
        }
        if dir.children.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let attr = Attr {
            ino,
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
            size,
            nlink: if kind == Kind::Directory { 2 } else { 1 },
            atime_ns: now_ns,
            mtime_ns: now_ns,
            ctime_ns: now_ns,
            dataset,
        };
        self.inodes.insert(
            ino,
            Inode {
                attr: attr.clone(),
                children: BTreeMap::new(),
                target: None,
            },
        );
        let dir = self.inode_mut(parent)?;
        dir.children.insert(name.to_string(), ino);
        dir.attr.mtime_ns = now_ns;
        dir.attr.ctime_ns = now_ns;
        if kind == Kind::Directory {
            dir.attr.nlink += 1;
        }
        Ok(attr)
    }

    /// Remove a name; returns the dataset of a file whose inode went with it.
    pub(super) fn remove_child(
        &mut self,
        parent: Ino,
        name: &str,
        now_ns: u64,
    ) -> Result<Option<Dataset>, FsError> {
        let dir = self.inode_mut(parent)?;
        let ino = dir.children.remove(name).ok_or(FsError::NotFound)?;
        dir.attr.mtime_ns = now_ns;
        dir.attr.ctime_ns = now_ns;
        let removed = self.inodes.remove(&ino).ok_or(FsError::NotFound)?;
        if let Some(dataset) = &removed.attr.dataset {
            self.leases.remove(&dataset.id);
        }
        if removed.attr.kind == Kind::Directory {
            self.inode_mut(parent)?.attr.nlink -= 1;
        }
        Ok(removed.attr.dataset)
    }

    pub(super) fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        now_ns: u64,
    ) -> Result<Option<Dataset>, FsError> {
        check_name(new_name)?;
        let ino = self.child(parent, name)?;
        if parent == new_parent && name == new_name {
            return Ok(None);
        }
        let moving_kind = self.inode(ino)?.attr.kind;
        // A directory may not move into itself or below itself.
        if moving_kind == Kind::Directory {
            let mut at = new_parent;
            while at != ROOT_INO {
                if at == ino {
                    return Err(FsError::Invalid(
                        "cannot move a directory into itself".into(),
                    ));
                }
                at = self.parent_of(at).ok_or(FsError::NotFound)?;
            }
        }
        let mut dropped = None;
        if let Ok(target) = self.child(new_parent, new_name) {
            let target_inode = self.inode(target)?;
            match (moving_kind, target_inode.attr.kind) {
                (Kind::Directory, Kind::File | Kind::Symlink) => return Err(FsError::NotDirectory),
                (Kind::File | Kind::Symlink, Kind::Directory) => return Err(FsError::IsDirectory),
                (Kind::Directory, Kind::Directory) if !target_inode.children.is_empty() => {
                    return Err(FsError::NotEmpty)
                }
                _ => {}
            }
            dropped = self.remove_child(new_parent, new_name, now_ns)?;
        }
        self.inode_mut(parent)?.children.remove(name);
        self.inode_mut(new_parent)?
            .children
            .insert(new_name.to_string(), ino);
        if moving_kind == Kind::Directory && parent != new_parent {
            self.inode_mut(parent)?.attr.nlink -= 1;
            self.inode_mut(new_parent)?.attr.nlink += 1;
        }
        for dir in [parent, new_parent] {
            let attr = &mut self.inode_mut(dir)?.attr;
            attr.mtime_ns = now_ns;
            attr.ctime_ns = now_ns;
        }
        self.inode_mut(ino)?.attr.ctime_ns = now_ns;
        Ok(dropped)
    }

    pub(super) fn parent_of(&self, ino: Ino) -> Option<Ino> {
        self.inodes
            .iter()
            .find(|(_, inode)| inode.children.values().any(|child| *child == ino))
            .map(|(parent, _)| *parent)
    }
}

pub(super) fn check_name(name: &str) -> Result<(), FsError> {
    if name.len() > NAME_MAX_BYTES {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::Invalid(format!("bad file name {name:?}")));
    }
    Ok(())
}

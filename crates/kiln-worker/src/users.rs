//! Users by name or number, read from the host's `/etc/passwd` directly
//! (no NSS), for the executor's action user and the sandbox's `dockerUser`;
//! and whom an executor's actions run as ([`ActionUsers`]): one user for
//! all, or a uid of its own for each runner ([`ActionUserPool`]), so that
//! two actions running at once, in the host's process and mount namespaces
//! under `none`, cannot reach each other's processes (`/proc/PID/cwd`,
//! signals, ptrace) or workspaces.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use kiln_platform::DockerUser;

/// Whom the actions of an executor run as, when they ask for no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionUsers {
    /// Every action runs as this `(uid, gid)`; None: as the executor's own
    /// user. Concurrent actions share it.
    One(Option<(u32, u32)>),
    /// Each runner (an action, or a warm runner for as long as it is kept)
    /// runs as a uid of its own from `first` to `last`, with the group of
    /// the same number and no other.
    Range { first: u32, last: u32 },
}

impl ActionUsers {
    /// One of these users, for what every one of them passes or fails
    /// alike (reaching the work root: none of a range has a group of its
    /// own beyond its number). None: the executor's own user.
    pub fn any(&self) -> Option<(u32, u32)> {
        match *self {
            ActionUsers::One(user) => user,
            ActionUsers::Range { first, .. } => Some((first, first)),
        }
    }
}

impl std::fmt::Display for ActionUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionUsers::One(None) => f.write_str("the executor's own user"),
            ActionUsers::One(Some((uid, gid))) => write!(f, "uid {uid}, gid {gid}"),
            ActionUsers::Range { first, last } => write!(f, "uids {first}-{last}"),
        }
    }
}

/// Leases [`ActionUsers`] out: each lease of a range is a uid no other
/// lease holds, and goes back to the pool when dropped. Uids are handed
/// out in turn, so one just given back is the last to be reused.
#[derive(Debug)]
pub struct ActionUserPool {
    users: ActionUsers,
    leased: Mutex<Leased>,
}

#[derive(Debug, Default)]
struct Leased {
    /// Offset in the range of the next uid to try.
    next: u64,
    taken: HashSet<u32>,
}

impl ActionUserPool {
    pub fn new(users: ActionUsers) -> Arc<ActionUserPool> {
        Arc::new(ActionUserPool {
            users,
            leased: Mutex::new(Leased::default()),
        })
    }

    pub fn users(&self) -> ActionUsers {
        self.users
    }

    /// A user for one runner; an error naming the range when every uid of
    /// it is held (by running actions and warm runners).
    pub fn lease(self: &Arc<Self>) -> Result<ActionUser, String> {
        let (first, last) = match self.users {
            ActionUsers::One(user) => return Ok(ActionUser { user, pool: None }),
            ActionUsers::Range { first, last } => (first, last),
        };
        let count = u64::from(last - first) + 1;
        let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
        // Some uid is free within `taken + 1` tries from anywhere.
        let tries = (leased.taken.len() as u64 + 1).min(count);
        for _ in 0..tries {
            let uid = first + (leased.next % count) as u32;
            leased.next = (leased.next + 1) % count;
            if leased.taken.insert(uid) {
                return Ok(ActionUser {
                    user: Some((uid, uid)),
                    pool: Some(self.clone()),
                });
            }
        }
        Err(format!(
            "every action user ({}, {count} of them) is held by a running action or a warm \
             runner; give --action-user a wider range, or keep fewer warm runners \
             (--max-warm-runners)",
            self.users
        ))
    }

    fn give_back(&self, uid: u32) {
        let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
        leased.taken.remove(&uid);
    }

    /// How many uids are leased now.
    pub fn leased(&self) -> usize {
        self.leased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .taken
            .len()
    }
}

/// The user one runner's actions run as, held for as long as the runner
/// (an action's directory, a warm runner and its persistent worker) lives;
/// given back to its pool when dropped.
#[derive(Debug)]
pub struct ActionUser {
    user: Option<(u32, u32)>,
    pool: Option<Arc<ActionUserPool>>,
}

impl ActionUser {
    /// `(uid, gid)`; None: the executor's own user.
    pub fn get(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// The executor's own user, held from no pool (for tests and
    /// directories no action runs in).
    pub fn own() -> ActionUser {
        ActionUser {
            user: None,
            pool: None,
        }
    }
}

impl Drop for ActionUser {
    fn drop(&mut self) {
        if let (Some(pool), Some((uid, _))) = (&self.pool, self.user) {
            pool.give_back(uid);
        }
    }
}

/// Whose uids in `first..=last` are taken on this machine, as `(whose,
/// uid)`: the users of `/etc/passwd`, and the subordinate ranges of
/// `/etc/subuid` (a rootless container's files). A range of action users
/// must hold none: an action running as one could reach their files.
pub fn named_in_range(first: u32, last: u32) -> Vec<(String, u32)> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let mut taken = named_in(first, last, &read("/etc/passwd"));
    taken.extend(subordinate_in(first, last, &read("/etc/subuid")));
    taken
}

fn named_in(first: u32, last: u32, passwd: &str) -> Vec<(String, u32)> {
    entries(passwd)
        .filter(|(_, uid, _)| (first..=last).contains(uid))
        .map(|(name, uid, _)| (name.to_string(), uid))
        .collect()
}

/// `/etc/subuid` lines (`name:start:count`) overlapping `first..=last`.
fn subordinate_in(first: u32, last: u32, subuid: &str) -> Vec<(String, u32)> {
    subuid
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let start: u64 = fields.next()?.trim().parse().ok()?;
            let count: u64 = fields.next()?.trim().parse().ok()?;
            let end = (start + count).checked_sub(1)?;
            let overlap = start.max(u64::from(first));
            (overlap <= end.min(u64::from(last))).then(|| {
                (
                    format!("the subordinate uids {start}-{end} of {name} (/etc/subuid)"),
                    overlap as u32,
                )
            })
        })
        .collect()
}

/// `user` as `(uid, gid)`: a name through `/etc/passwd`; a bare uid gets
/// its passwd group, or the gid equal to it when it has no entry. The
/// error names the user.
pub fn resolve(user: &DockerUser) -> Result<(u32, u32), String> {
    resolve_in(
        user,
        &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
    )
}

fn resolve_in(user: &DockerUser, passwd: &str) -> Result<(u32, u32), String> {
    match user {
        DockerUser::UidGid(uid, gid) => Ok((*uid, *gid)),
        DockerUser::Uid(uid) => Ok((
            *uid,
            entries(passwd)
                .find(|(_, u, _)| u == uid)
                .map_or(*uid, |(_, _, gid)| gid),
        )),
        DockerUser::Name(name) => entries(passwd)
            .find(|(n, _, _)| n == name)
            .map(|(_, uid, gid)| (uid, gid))
            .ok_or_else(|| format!("no user {name} in /etc/passwd (use a uid or uid:gid)")),
    }
}

fn entries(text: &str) -> impl Iterator<Item = (&str, u32, u32)> {
    text.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((name, uid, gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uids_resolve_through_passwd() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nbuild:x:1000:100::/home/build:/bin/sh\nbroken\n";
        let name = |n: &str| DockerUser::Name(n.into());
        assert_eq!(resolve_in(&name("build"), passwd), Ok((1000, 100)));
        assert_eq!(resolve_in(&DockerUser::Uid(1000), passwd), Ok((1000, 100)));
        assert_eq!(resolve_in(&DockerUser::Uid(4242), passwd), Ok((4242, 4242)));
        assert_eq!(resolve_in(&DockerUser::UidGid(7, 8), passwd), Ok((7, 8)));
        let missing = resolve_in(&name("ghost"), passwd).unwrap_err();
        assert!(missing.contains("ghost"), "{missing}");
    }

    #[test]
    fn users_of_the_machine_in_a_range_are_found() {
        let passwd = "root:x:0:0::/root:/bin/sh\nbuild:x:1000:100::/h:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
        assert_eq!(named_in(1, 999, passwd), vec![]);
        assert_eq!(named_in(500, 1000, passwd), vec![("build".into(), 1000)]);
        assert_eq!(named_in(0, u32::MAX - 1, passwd).len(), 3);
        let subuid = "build:100000:65536\nempty:5:0\n";
        assert_eq!(subordinate_in(1, 99_999, subuid), vec![]);
        assert_eq!(subordinate_in(165_536, 200_000, subuid), vec![]);
        let over = subordinate_in(150_000, 200_000, subuid);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].1, 150_000);
        assert!(
            over[0].0.contains("100000-165535 of build"),
            "{}",
            over[0].0
        );
        assert_eq!(
            subordinate_in(0, 10, subuid),
            vec![],
            "an empty range holds nothing"
        );
    }

    #[test]
    fn a_range_leases_each_uid_to_one_runner_at_a_time() {
        let pool = ActionUserPool::new(ActionUsers::Range {
            first: 5000,
            last: 5002,
        });
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        let c = pool.lease().unwrap();
        let mut uids: Vec<_> = [&a, &b, &c].iter().map(|u| u.get().unwrap().0).collect();
        uids.sort();
        assert_eq!(uids, vec![5000, 5001, 5002]);
        assert_eq!(a.get(), Some((5000, 5000)), "the group of the same number");
        let full = pool.lease().unwrap_err();
        assert!(
            full.contains("5000-5002") && full.contains("--action-user"),
            "{full}"
        );

        // Given back when dropped; handed out again, and only it.
        drop(b);
        assert_eq!(pool.leased(), 2);
        let again = pool.lease().unwrap();
        assert_eq!(again.get(), Some((5001, 5001)));
        assert!(pool.lease().is_err());
    }

    #[test]
    fn a_uid_given_back_is_the_last_to_be_reused() {
        let pool = ActionUserPool::new(ActionUsers::Range {
            first: 10,
            last: 13,
        });
        let first = pool.lease().unwrap().get();
        // Dropped at once: the next leases go on through the range.
        let next: Vec<_> = (0..3).map(|_| pool.lease().unwrap().get()).collect();
        assert_eq!(first, Some((10, 10)));
        assert_eq!(next, vec![Some((11, 11)), Some((12, 12)), Some((13, 13))]);
        assert_eq!(pool.lease().unwrap().get(), Some((10, 10)));
        assert_eq!(pool.leased(), 0);
    }

    #[test]
    fn one_user_is_shared_by_every_lease() {
        let pool = ActionUserPool::new(ActionUsers::One(Some((65534, 65534))));
        let leases: Vec<_> = (0..3).map(|_| pool.lease().unwrap()).collect();
        assert!(leases.iter().all(|l| l.get() == Some((65534, 65534))));
        assert_eq!(pool.leased(), 0);
        let own = ActionUserPool::new(ActionUsers::One(None));
        assert_eq!(own.lease().unwrap().get(), None);
    }

    #[test]
    fn a_range_up_to_the_last_uid_wraps_without_overflow() {
        let pool = ActionUserPool::new(ActionUsers::Range {
            first: u32::MAX - 2,
            last: u32::MAX - 1,
        });
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_eq!(a.get().unwrap().0, u32::MAX - 2);
        assert_eq!(b.get().unwrap().0, u32::MAX - 1);
        assert!(pool.lease().is_err());
    }
}

//! The share of the CPU that adapter generation may take from decoding. A generation runs its
//! tensor work (candle's GEMMs and our own parallel loops, all on rayon) inside a thread pool
//! of its own, so it uses at most `threads` cores, and on Linux those threads run at a lower
//! scheduling priority, so that sequences already decoding keep the cores they need and a
//! generation takes what they leave idle.

use std::sync::Arc;

use crate::error::{DndError, Result};

/// How many threads generation uses, at what priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationShare {
    /// Threads of the generation pool; 0: no pool of its own (rayon's global pool, every
    /// core, the engine's priority).
    pub threads: usize,
    /// The pool threads' nice value (Linux; 0 to 19, higher yields more to decoding).
    pub nice: i32,
    /// Run the pool threads under Linux's `SCHED_IDLE` policy: only on cores no other thread
    /// wants, preempted at once when one does (the nice value then does not matter).
    pub idle: bool,
    /// Most prompt sets generated together when misses queue up (1: one at a time). On 2 CPU
    /// cores a batch was no faster than its sets one by one and made each set wait for the
    /// whole batch (README "Server benchmark"), so the default is 1.
    pub max_batch: usize,
}

impl Default for GenerationShare {
    /// Every core at the engine's priority: generation as fast as it can, decoding slowed
    /// while it runs.
    fn default() -> Self {
        Self {
            threads: 0,
            nice: 0,
            idle: false,
            max_batch: 1,
        }
    }
}

impl GenerationShare {
    /// Half the cores (at least one) at nice 10. On 2 cores this did not keep decoding faster
    /// while cold prompt sets arrived (README "Server benchmark": the stall is the arrivals'
    /// prefill steps, not generation's CPU time), so it is not the server's default.
    pub fn background() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            threads: (cores / 2).max(1),
            nice: 10,
            idle: false,
            max_batch: 1,
        }
    }

    /// The pool this share runs generations in (`None`: rayon's global pool).
    pub fn pool(self) -> Result<Option<Arc<rayon::ThreadPool>>> {
        if self.max_batch == 0 {
            return Err(DndError::InvalidInput(
                "the generation batch bound must be at least 1".into(),
            ));
        }
        if self.threads == 0 {
            if self.nice != 0 || self.idle {
                // Without a pool of its own there is no thread to lower.
                return Err(DndError::InvalidInput(
                    "a generation priority needs a generation thread count above 0".into(),
                ));
            }
            return Ok(None);
        }
        if !(0..=19).contains(&self.nice) {
            return Err(DndError::InvalidInput(format!(
                "generation nice value {} is outside 0..=19",
                self.nice
            )));
        }
        let (nice, idle) = (self.nice, self.idle);
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("dnd-generation-{i}"))
            .start_handler(move |_| lower_priority(nice, idle))
            .build()
            .map(|p| Some(Arc::new(p)))
            .map_err(|e| DndError::InvalidInput(format!("generation thread pool: {e}")))
    }
}

/// Runs `f` in `pool` (every rayon call inside it then stays there), or here without one.
pub fn run_in<T: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Lowers the calling thread's priority (Linux threads have their own nice value and policy).
fn lower_priority(nice: i32, idle: bool) {
    #[cfg(target_os = "linux")]
    if idle {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscalls on the calling thread's own id, with a valid parameter.
        let failed = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
            libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0
        };
        if failed {
            tracing::warn!("could not run the generation threads under SCHED_IDLE");
        }
    } else if nice > 0 {
        // SAFETY: plain syscalls on the calling thread's own id.
        let failed = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0
        };
        if failed {
            tracing::warn!(nice, "could not lower the generation threads' priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (nice, idle);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_bounds_the_threads_of_the_work_inside_it() {
        let share = GenerationShare {
            threads: 1,
            nice: 10,
            idle: false,
            max_batch: 1,
        };
        let pool = share.pool().unwrap().unwrap();
        // Nested parallel work inside the pool runs on its one thread.
        let threads = run_in(Some(&pool), || {
            use rayon::prelude::*;
            let ids: std::collections::HashSet<_> = (0..64)
                .into_par_iter()
                .map(|_| std::thread::current().id())
                .collect();
            ids.len()
        });
        assert_eq!(threads, 1);
        #[cfg(target_os = "linux")]
        {
            let nice = run_in(Some(&pool), || unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            });
            assert_eq!(nice, 10);
        }
        assert!(GenerationShare::default().pool().unwrap().is_none());
        assert!(GenerationShare {
            threads: 0,
            nice: 10,
            idle: false,
            max_batch: 1,
        }
        .pool()
        .is_err());
        let idle = GenerationShare {
            threads: 1,
            nice: 0,
            idle: true,
            max_batch: 1,
        };
        #[cfg(target_os = "linux")]
        {
            let policy = run_in(Some(&idle.pool().unwrap().unwrap()), || unsafe {
                libc::sched_getscheduler(libc::syscall(libc::SYS_gettid) as libc::pid_t)
            });
            assert_eq!(policy, libc::SCHED_IDLE);
        }
        assert!(GenerationShare {
            threads: 1,
            nice: 25,
            idle: false,
            max_batch: 1,
        }
        .pool()
        .is_err());
    }
}

//! The threads the CPU kernels split their rows over: persistent workers that spin between
//! calls, so handing out a matmul costs well under a microsecond.
//!
//! Why not rayon here: on the 2-core VMs we run on, a rayon `for_each` over two tasks costs
//! 18–25 µs back to back and about 70 µs after a 100 µs pause (a futex wake of a sleeping
//! worker), measured with a standalone timing loop; SmolLM2's 576×576 projection takes 28 µs on
//! one core. A decode step makes over 200 such calls, so rayon's wake-up cost was more than the
//! arithmetic. llama.cpp keeps its threads spinning between ops for the same reason. Workers
//! here spin for [`SPIN`] after their last job (yielding the core now and then, so rayon's
//! threads, which candle's own ops use, still get it), then park on a condition variable.
//!
//! One call runs at a time; a call made while another is running (two models in one process,
//! tests in parallel) runs its tasks on the calling thread, which is correct, only not parallel.
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
pub const SPIN: Duration = Duration::from_millis(2);

/// One call's work, on the caller's stack while the call lasts.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

struct Pool {
    workers: usize,
    /// Bumped once per call; a worker that sees a new value runs the job in `job`.
    generation: AtomicUsize,
    /// Points at a `Job` whose lifetime the caller guarantees until `active` is back to 0.
    job: AtomicPtr<Job<'static>>,
    /// Workers that have not finished the current call.
    active: AtomicUsize,
    /// Held by the caller of the running call.
    busy: Mutex<()>,
    parked: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

static POOL: OnceLock<&'static Pool> = OnceLock::new();

/// Threads a call uses (the caller and the workers); rayon's thread count when the pool was
/// first used, which `--threads` sets.
pub fn threads() -> usize {
    pool().workers + 1
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let workers = rayon::current_num_threads().max(1) - 1;
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            busy: Mutex::new(()),
            parked: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("awq-kernel-{i}"))
                .spawn(move || pool.work())
                .expect("spawning a kernel worker thread");
        }
        pool
    })
}

impl Pool {
    fn work(&self) {
        let mut seen = 0;
        loop {
            seen = self.wait_for_job(seen);
            // SAFETY: the caller published the job before bumping the generation and keeps it
            // alive until this worker has decremented `active`.
            let job = unsafe { &*self.job.load(Ordering::Acquire) };
            run_tasks(job);
            self.active.fetch_sub(1, Ordering::Release);
        }
    }

    /// Spins, then parks, until the generation moves past `seen`; returns the new one.
    fn wait_for_job(&self, seen: usize) -> usize {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = self.generation.load(Ordering::SeqCst);
            if g != seen {
                return g;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(256) {
                if start.elapsed() > SPIN {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let mut guard = self.park.lock().unwrap_or_else(|e| e.into_inner());
        self.parked.fetch_add(1, Ordering::SeqCst);
        loop {
            let g = self.generation.load(Ordering::SeqCst);
            if g != seen {
                self.parked.fetch_sub(1, Ordering::SeqCst);
                return g;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn run_tasks(job: &Job) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| (job.f)(i))).is_err() {
            job.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `f(0) .. f(tasks - 1)` over the pool's threads and returns when all have finished; a
/// panic in any task is raised again here, after every thread has let go of `f`.
pub fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let busy = if pool.workers == 0 || tasks < 2 { None } else { pool.busy.try_lock().ok() };
    let Some(_busy) = busy else {
        (0..tasks).for_each(f);
        return;
    };
    let job = Job { f, tasks, next: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
    pool.active.store(pool.workers, Ordering::Relaxed);
    // The pointer's 'static is a lie the wait below makes true: no worker reads the job after
    // `active` reaches 0, and this function does not return before that.
    pool.job.store(&job as *const Job as *mut Job<'static>, Ordering::Release);
    pool.generation.fetch_add(1, Ordering::SeqCst);
    if pool.parked.load(Ordering::SeqCst) > 0 {
        let _g = pool.park.lock().unwrap_or_else(|e| e.into_inner());
        pool.wake.notify_all();
    }
    run_tasks(&job);
    let mut spins = 0u32;
    while pool.active.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            std::thread::yield_now();
        }
    }
    if job.panicked.load(Ordering::Relaxed) {
        resume_unwind(Box::new("a CPU kernel task panicked"));
    }
}

/// `0 .. n` cut into about four ranges per thread (so a thread the OS has taken away costs a
/// quarter of its share, not all of it), `f(range)` run for each over the pool.
pub fn for_ranges(n: usize, min_len: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    for_ranges_per_thread(n, min_len, 4, f)
}

/// [`for_ranges`] with about `per_thread` ranges per thread.
pub fn for_ranges_per_thread(n: usize, min_len: usize, per_thread: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let chunks = (threads() * per_thread.max(1)).min(n.div_ceil(min_len.max(1))).max(1);
    let len = n.div_ceil(chunks);
    run(n.div_ceil(len.max(1)), &|c| f(c * len..((c + 1) * len).min(n)));
}

/// An f32 buffer that tasks of one [`run`] write in disjoint parts (rows, columns, single
/// elements), handed to every task by copy.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: every user hands each task its own part of one buffer, alive for the whole run.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Stores `v` at element `i`.
    ///
    /// # Safety
    /// `i` is inside the buffer and no other task writes it.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }

    /// Elements `r` of the buffer.
    ///
    /// # Safety
    /// The range is inside the buffer and no other task touches it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range<'a>(self, r: std::ops::Range<usize>) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(r.start), r.len())
    }

    /// Row `i` of a buffer of rows of `len` values.
    ///
    /// # Safety
    /// The row is inside the buffer and no other task touches it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row<'a>(self, i: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(i * len), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_panics_come_back() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{tasks} tasks");
        }
        let seen = AtomicUsize::new(0);
        for_ranges(1001, 10, |r| {
            seen.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(seen.load(Ordering::Relaxed), 1001);
        let r = catch_unwind(|| run(8, &|i| assert!(i != 5, "task five")));
        assert!(r.is_err());
        // The pool still works after a panic, and from several threads at once.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let sum = AtomicUsize::new(0);
                        run(16, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 120);
                    }
                });
            }
        });
    }
}

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

#[derive(Debug)]
struct Blob(usize);

type Cache = AdapterCache<String, Blob, (), String>;

fn cache(max_entries: usize, max_bytes: usize, wait_ms: u64) -> Arc<Cache> {
    AdapterCache::new(
        CacheLimits {
            max_entries,
            max_bytes,
            wait_timeout: Duration::from_millis(wait_ms),
        },
        |b: &Blob| b.0,
    )
}

async fn fetch(c: &Arc<Cache>, key: &str, bytes: usize) -> Lookup<Blob, ()> {
    c.get_or_generate(key.to_string(), (), bytes, move || async move {
        Ok(Blob(bytes))
    })
    .await
    .unwrap()
}

fn keys(c: &Cache) -> Vec<String> {
    let mut k: Vec<String> = c.entries().into_iter().map(|e| e.key).collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_key_generate_once() {
    let c = cache(4, 1000, 1000);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, runs) = (c.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            c.get_or_generate("k".to_string(), (), 10, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(Blob(10))
            })
            .await
            .unwrap()
            .source
        }));
    }
    let mut sources = Vec::new();
    for t in tasks {
        sources.push(t.await.unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Generated).count(),
        1
    );
    let s = c.stats();
    assert_eq!(s.misses.load(Ordering::SeqCst), 1);
    assert_eq!(
        s.joins.load(Ordering::SeqCst) + s.hits.load(Ordering::SeqCst),
        7
    );
    assert_eq!(fetch(&c, "k", 10).await.source, Source::Cached);
}

#[tokio::test]
async fn least_recently_used_entry_is_evicted_by_count() {
    let c = cache(2, 1000, 100);
    fetch(&c, "a", 1).await;
    fetch(&c, "b", 1).await;
    assert_eq!(fetch(&c, "a", 1).await.source, Source::Cached);
    fetch(&c, "c", 1).await;
    assert_eq!(keys(&c), ["a", "c"]);
    assert_eq!(c.stats().evictions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn byte_budget_is_never_exceeded() {
    let c = cache(100, 250, 100);
    for k in ["a", "b", "c", "d", "a", "e"] {
        fetch(&c, k, 100).await;
        assert!(c.resident_bytes() <= 250);
    }
    assert_eq!(c.len(), 2);
    assert_eq!(c.stats().peak_bytes.load(Ordering::SeqCst), 200);
    assert_eq!(
        c.get_or_generate("big".into(), (), 251, || async { Ok(Blob(251)) })
            .await
            .unwrap_err(),
        CacheError::TooLarge {
            bytes: 251,
            budget: 250
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_in_use_are_kept_and_a_miss_waits_for_a_release() {
    let c = cache(1, 1000, 5000);
    let held = fetch(&c, "a", 10).await;
    let c2 = c.clone();
    let waiter = tokio::spawn(async move { fetch(&c2, "b", 10).await.source });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!waiter.is_finished(), "evicted an entry still in use");
    assert_eq!(keys(&c), ["a"]);
    assert!(c.entries()[0].in_use);
    drop(held);
    // Dropping the last lease wakes the waiter (the bound only stops a hang; a loaded machine
    // may be slow to schedule it).
    let source = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter saw the release")
        .unwrap();
    assert_eq!(source, Source::Generated);
    assert_eq!(keys(&c), ["b"]);
}

#[tokio::test]
async fn a_miss_gives_up_when_nothing_is_released() {
    let c = cache(1, 1000, 100);
    let _held = fetch(&c, "a", 10).await;
    let err = c
        .get_or_generate("b".into(), (), 10, || async { Ok(Blob(10)) })
        .await
        .unwrap_err();
    assert_eq!(err, CacheError::Busy(Duration::from_millis(100)));
    assert_eq!(c.stats().busy.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_miss_that_cannot_fit_evicts_nothing() {
    // 300 bytes: a pinned 200 and an unpinned 50. A 150-byte miss would not fit even with the
    // 50 evicted, so it waits (and gives up) with the 50 still cached.
    let c = cache(100, 300, 50);
    let _held = fetch(&c, "pinned", 200).await;
    fetch(&c, "free", 50).await;
    let err = c
        .get_or_generate("big".into(), (), 150, || async { Ok(Blob(150)) })
        .await
        .unwrap_err();
    assert_eq!(err, CacheError::Busy(Duration::from_millis(50)));
    assert_eq!(keys(&c), ["free", "pinned"]);
    assert_eq!(c.stats().evictions.load(Ordering::SeqCst), 0);
    // One that fits once the 50 goes evicts it, and only it.
    fetch(&c, "small", 80).await;
    assert_eq!(keys(&c), ["pinned", "small"]);
    assert_eq!(c.stats().evictions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_under_estimated_generation_stays_inside_the_budget() {
    // Each generation reserves 10 bytes but weighs 100: finishing must make room for all 100,
    // so with 195 bytes only one fits (room for the 90 the estimate missed would keep two).
    let c = cache(100, 195, 100);
    for k in ["a", "b", "c", "d"] {
        let got = c
            .get_or_generate(k.into(), (), 10, || async { Ok(Blob(100)) })
            .await
            .unwrap();
        assert_eq!(got.value.0, 100);
        assert!(
            c.resident_bytes() <= 195,
            "{} bytes after {k}",
            c.resident_bytes()
        );
    }
    assert_eq!(keys(&c), ["d"]);
    assert!(c.stats().peak_bytes.load(Ordering::SeqCst) <= 195);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_reach_every_waiter_and_are_not_cached() {
    let c = cache(2, 100, 100);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.get_or_generate("k".to_string(), (), 50, || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err::<Blob, _>("weights are NaN".to_string())
            })
            .await
            .unwrap_err()
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            CacheError::Generation("weights are NaN".into())
        );
    }
    assert_eq!(c.resident_bytes(), 0, "reservation released");
    assert!(c.is_empty());
    // A later lookup tries again.
    assert_eq!(fetch(&c, "k", 50).await.source, Source::Generated);
}

#[tokio::test]
async fn a_panicking_generation_becomes_an_error() {
    let c = cache(2, 100, 100);
    let err = c
        .get_or_generate("k".to_string(), (), 50, || async {
            if true {
                panic!("generator bug");
            }
            Ok(Blob(1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Panicked(m) if m.contains("panic")));
    assert_eq!(c.resident_bytes(), 0);
    assert_eq!(c.stats().failures.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn removal_refuses_entries_in_use() {
    let c = cache(4, 1000, 100);
    let held = fetch(&c, "a", 10).await;
    assert_eq!(c.remove(&"a".into()), Err(RemoveError::InUse));
    assert_eq!(c.remove(&"zz".into()), Err(RemoveError::NotFound));
    drop(held);
    assert_eq!(c.remove(&"a".into()), Ok(()));
    assert_eq!(c.resident_bytes(), 0);
    assert!(c.get(&"a".into()).is_none());
}

#[tokio::test]
async fn generation_latency_is_recorded() {
    let c = cache(4, 1000, 100);
    c.get_or_generate("k".to_string(), (), 1, || async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok(Blob(1))
    })
    .await
    .unwrap();
    let s = c.stats();
    assert_eq!(s.generations.load(Ordering::SeqCst), 1);
    let secs = s.generation_micros.load(Ordering::SeqCst) as f64 / 1e6;
    assert!(secs >= 0.03, "{secs}");
    // The one generation sits in the bucket of its own recorded time (on a loaded machine a
    // 30 ms sleep can take longer than the 50 ms bound of the bucket it would otherwise hit).
    let bucket = GENERATION_BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(GENERATION_BUCKETS.len());
    for (i, n) in s.generation_buckets.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::SeqCst),
            u64::from(i == bucket),
            "bucket {i}"
        );
    }
}

#[tokio::test]
async fn an_entry_is_in_use_while_any_of_its_leases_lives() {
    let c = cache(4, 1000, 100);
    let first = fetch(&c, "a", 10).await.value;
    let second = fetch(&c, "a", 10).await.value;
    let clone = first.clone();
    drop(first);
    drop(second);
    assert!(c.entries()[0].in_use, "a clone is a lease of its own");
    assert_eq!(c.remove(&"a".into()), Err(RemoveError::InUse));
    drop(clone);
    assert!(!c.entries()[0].in_use);
    assert_eq!(c.remove(&"a".into()), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_entry_stays_in_use_until_its_waiters_have_their_leases() {
    // One generation, three waiters: once all have answers and have dropped them, the entry is
    // free; while one still holds its value it is in use.
    let c = cache(4, 1000, 100);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { fetch(&c, "k", 10).await.value })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.unwrap());
    }
    assert!(c.entries()[0].in_use);
    let last = values.pop().unwrap();
    drop(values);
    assert!(c.entries()[0].in_use);
    drop(last);
    // The flight's own lease went with the last waiter's: nothing left holds the entry.
    assert!(!c.entries()[0].in_use);
}

/// A value that knows where it is: `Blob` sizes tagged by tier, so a test sees that a restored
/// value went through `restore` (host to device) and not through the generator.
#[derive(Debug, Clone, PartialEq)]
struct Placed {
    bytes: usize,
    on_host: bool,
    made: usize,
}

type TieredCache = AdapterCache<String, Placed, (), String>;

/// A cache holding `entries` on the device and `host_bytes` in host memory; `fail_restore`
/// makes every copy back fail.
fn tiered(entries: usize, host_bytes: usize, fail_restore: bool) -> Arc<TieredCache> {
    tiered_counting(entries, host_bytes, fail_restore, Arc::default())
}

/// [`tiered`], counting the copies back in `restores` (each taking 50 ms).
fn tiered_counting(
    entries: usize,
    host_bytes: usize,
    fail_restore: bool,
    restores: Arc<AtomicUsize>,
) -> Arc<TieredCache> {
    AdapterCache::with_host_tier(
        CacheLimits {
            max_entries: entries,
            max_bytes: 1000,
            wait_timeout: Duration::from_millis(100),
        },
        |p: &Placed| p.bytes,
        HostTier {
            max_bytes: host_bytes,
            offload: Arc::new(|p: &Placed| {
                assert!(!p.on_host, "only device values are offloaded");
                Ok(Placed {
                    on_host: true,
                    ..p.clone()
                })
            }),
            restore: Arc::new(move |p: &Placed| {
                assert!(p.on_host, "only host values are restored");
                restores.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                if fail_restore {
                    return Err("device out of memory".to_string());
                }
                Ok(Placed {
                    on_host: false,
                    ..p.clone()
                })
            }),
        },
    )
}

/// Looks `key` up; a generation makes a value stamped with the running count `made`.
async fn tiered_fetch(
    c: &Arc<TieredCache>,
    key: &str,
    bytes: usize,
    made: &Arc<AtomicUsize>,
) -> Result<Lookup<Placed, ()>, CacheError<String>> {
    let made = made.clone();
    c.get_or_generate(key.to_string(), (), bytes, move || async move {
        Ok(Placed {
            bytes,
            on_host: false,
            made: made.fetch_add(1, Ordering::SeqCst) + 1,
        })
    })
    .await
}

#[tokio::test]
async fn evicted_entries_come_back_from_the_host_tier_without_being_made_again() {
    let c = tiered(1, 100, false);
    let made = Arc::new(AtomicUsize::new(0));
    let a = tiered_fetch(&c, "a", 30, &made).await.unwrap();
    assert_eq!((a.source, a.value.made), (Source::Generated, 1));
    drop(a);
    // One device entry: b evicts a, which drops to host memory.
    drop(tiered_fetch(&c, "b", 20, &made).await.unwrap());
    assert_eq!(keys_of(&c), ["b"]);
    assert_eq!(c.host_usage(), (30, 1));
    assert_eq!(c.peek_meta(&"a".to_string()), Some(()));
    let held = c.host_entries();
    assert_eq!(
        (held.len(), held[0].key.as_str(), held[0].bytes),
        (1, "a", 30)
    );
    assert!(!held[0].in_use);
    // a comes back by a copy (the same value, on the device again), and b goes down.
    let back = tiered_fetch(&c, "a", 30, &made).await.unwrap();
    assert_eq!(back.source, Source::Restored);
    assert_eq!(
        *back.value.value().as_ref(),
        Placed {
            bytes: 30,
            on_host: false,
            made: 1
        }
    );
    assert_eq!(
        made.load(Ordering::SeqCst),
        2,
        "nothing was generated for the restore"
    );
    assert_eq!(c.host_usage(), (20, 1));
    assert_eq!(c.resident_bytes(), 30);
    drop(back);
    assert_eq!(
        tiered_fetch(&c, "a", 30, &made).await.unwrap().source,
        Source::Cached
    );
    let s = c.stats();
    assert_eq!(
        (
            s.offloads.load(Ordering::SeqCst),
            s.restores.load(Ordering::SeqCst)
        ),
        (2, 1)
    );
    // Restores are not generations.
    assert_eq!(s.generations.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_host_tier_keeps_to_its_own_budget_dropping_the_oldest() {
    let c = tiered(1, 50, false);
    let made = Arc::new(AtomicUsize::new(0));
    for k in ["a", "b", "c", "d"] {
        drop(tiered_fetch(&c, k, 20, &made).await.unwrap());
    }
    // d on the device; c and b in host memory (40 of 50 bytes); a was dropped for c.
    assert_eq!(c.host_usage(), (40, 2));
    assert_eq!(c.stats().host_drops.load(Ordering::SeqCst), 1);
    assert!(c.peek_meta(&"a".to_string()).is_none());
    // A lookup by key alone (no way to make it) finds c in host memory, and not a.
    let held = c.get_held(&"c".to_string()).await.unwrap().unwrap();
    assert_eq!((held.source, held.value.made), (Source::Restored, 3));
    drop(held);
    assert!(c.get_held(&"a".to_string()).await.is_none());
    let a = tiered_fetch(&c, "a", 20, &made).await.unwrap();
    assert_eq!((a.source, a.value.made), (Source::Generated, 5));
    assert_eq!(made.load(Ordering::SeqCst), 5);
    drop(a);
    // Larger than the whole host budget: dropped on eviction, never held.
    drop(tiered_fetch(&c, "big", 60, &made).await.unwrap());
    drop(tiered_fetch(&c, "e", 10, &made).await.unwrap());
    assert!(c.host_usage().0 <= 50, "{:?}", c.host_usage());
    assert!(c.peek_meta(&"big".to_string()).is_none());
}

#[tokio::test]
async fn a_failed_restore_reaches_the_lookup_and_removal_clears_the_host_tier() {
    let c = tiered(1, 100, true);
    let made = Arc::new(AtomicUsize::new(0));
    drop(tiered_fetch(&c, "a", 30, &made).await.unwrap());
    drop(tiered_fetch(&c, "b", 30, &made).await.unwrap());
    let oom = CacheError::Generation("device out of memory".to_string());
    assert_eq!(tiered_fetch(&c, "a", 30, &made).await.unwrap_err(), oom);
    // The host copy stays for a later try (it fails again here), and nothing was generated;
    // b went down to make room for the copy that failed.
    assert_eq!(c.host_usage(), (60, 2));
    assert_eq!(tiered_fetch(&c, "a", 30, &made).await.unwrap_err(), oom);
    assert_eq!(made.load(Ordering::SeqCst), 2);
    assert_eq!(
        c.stats().restores.load(Ordering::SeqCst),
        0,
        "none succeeded"
    );
    assert!(keys_of(&c).is_empty());
    // Removed from host memory on request, one key at a time.
    assert_eq!(c.remove(&"a".to_string()), Ok(()));
    assert_eq!(c.host_usage(), (30, 1));
    assert_eq!(c.remove(&"a".to_string()), Err(RemoveError::NotFound));
    assert!(c.peek_meta(&"b".to_string()).is_some());
}

fn keys_of(c: &TieredCache) -> Vec<String> {
    c.entries().into_iter().map(|e| e.key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_a_host_entry_share_one_copy_back() {
    let restores = Arc::new(AtomicUsize::new(0));
    let c = tiered_counting(1, 100, false, restores.clone());
    let made = Arc::new(AtomicUsize::new(0));
    drop(tiered_fetch(&c, "a", 30, &made).await.unwrap());
    drop(tiered_fetch(&c, "b", 30, &made).await.unwrap());
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, made) = (c.clone(), made.clone());
        tasks.push(tokio::spawn(async move {
            tiered_fetch(&c, "a", 30, &made).await.unwrap().source
        }));
    }
    let mut sources = Vec::new();
    for t in tasks {
        sources.push(t.await.unwrap());
    }
    assert_eq!(restores.load(Ordering::SeqCst), 1, "{sources:?}");
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Restored).count(),
        1
    );
    assert!(sources
        .iter()
        .all(|s| matches!(s, Source::Restored | Source::Joined | Source::Cached)));
    assert_eq!(made.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_restore_whose_evictions_fill_the_host_tier_keeps_what_it_restores() {
    // One entry on the device, room for one in host memory: restoring a evicts b, whose copy
    // needs all of the host tier, where a was until this lookup took it out.
    let c = tiered(1, 30, false);
    let made = Arc::new(AtomicUsize::new(0));
    drop(tiered_fetch(&c, "a", 30, &made).await.unwrap());
    drop(tiered_fetch(&c, "b", 30, &made).await.unwrap());
    let back = tiered_fetch(&c, "a", 30, &made).await.unwrap();
    assert_eq!((back.source, back.value.made), (Source::Restored, 1));
    assert_eq!(keys_of(&c), ["a"]);
    assert_eq!(c.host_entries()[0].key, "b");
    assert_eq!(c.host_usage(), (30, 1));
}

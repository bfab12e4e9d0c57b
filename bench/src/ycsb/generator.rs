//! YCSB's key choosers, after CoreWorkload: hashed insert order (FNV-1a 64 over the 8
//! little-endian bytes, absolute value), zipfian by Gray et al.'s method (constant 0.99),
//! scrambled zipfian (a zipfian over 10^10 items with the precomputed zeta, hashed modulo the
//! item count), "latest" (the newest insert minus a zipfian offset) and uniform.

use rand::Rng;

pub const ZIPFIAN_CONSTANT: f64 = 0.99;
/// Items of the zipfian behind the scrambled one, and its zeta (YCSB precomputes it).
pub const SCRAMBLED_ITEMS: u64 = 10_000_000_000;
pub const SCRAMBLED_ZETAN: f64 = 26.469_028_202_783_02;

const FNV_OFFSET_BASIS_64: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME_64: u64 = 1_099_511_628_211;

/// YCSB's `Utils.fnvhash64`: FNV-1a over the value's 8 bytes, low byte first, then the
/// absolute value of the signed result (i64::MIN stays as it is, as in Java).
pub fn fnv_hash64(mut value: u64) -> u64 {
    let mut hash = FNV_OFFSET_BASIS_64;
    for _ in 0..8 {
        hash ^= value & 0xff;
        hash = hash.wrapping_mul(FNV_PRIME_64);
        value >>= 8;
    }
    (hash as i64).unsigned_abs()
}

/// The key of record `number` with hashed insert order: `user` + decimal hash.
pub fn key_name(number: u64) -> String {
    format!("user{}", fnv_hash64(number))
}

fn zeta(from: u64, to: u64, theta: f64, initial: f64) -> f64 {
    (from..to).fold(initial, |sum, index| {
        sum + 1.0 / ((index + 1) as f64).powf(theta)
    })
}

/// Zipfian over `0..items` (item 0 the most popular); the item count may grow (for
/// "latest"), zeta is then extended incrementally.
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    pub fn new(items: u64) -> Zipfian {
        let zetan = zeta(0, items, ZIPFIAN_CONSTANT, 0.0);
        Zipfian::with_zetan(items, zetan)
    }

    pub fn with_zetan(items: u64, zetan: f64) -> Zipfian {
        assert!(items >= 1, "a zipfian needs at least one item");
        let theta = ZIPFIAN_CONSTANT;
        let zeta2 = zeta(0, 2, theta, 0.0);
        let mut zipfian = Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2,
            zetan,
            eta: 0.0,
        };
        zipfian.eta = zipfian.eta_for(items);
        zipfian
    }

    fn eta_for(&self, items: u64) -> f64 {
        (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    /// Grow to `items` (never shrinks), as YCSB does for a growing key space.
    pub fn grow_to(&mut self, items: u64) {
        if items > self.items {
            self.zetan = zeta(self.items, items, self.theta, self.zetan);
            self.items = items;
            self.eta = self.eta_for(items);
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let value = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        value.min(self.items - 1)
    }
}

/// Scrambled zipfian over `0..items`: popular items spread over the key space.
pub struct ScrambledZipfian {
    items: u64,
    zipfian: Zipfian,
}

impl ScrambledZipfian {
    pub fn new(items: u64) -> ScrambledZipfian {
        ScrambledZipfian {
            items,
            zipfian: Zipfian::with_zetan(SCRAMBLED_ITEMS, SCRAMBLED_ZETAN),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        fnv_hash64(self.zipfian.next(rng)) % self.items
    }
}

/// "latest": the most recently inserted record is the most popular.
pub struct Latest {
    zipfian: Zipfian,
}

impl Latest {
    pub fn new(records: u64) -> Latest {
        Latest {
            zipfian: Zipfian::new(records.max(1)),
        }
    }

    /// A record number among `0..=newest`.
    pub fn next(&mut self, newest: u64, rng: &mut impl Rng) -> u64 {
        self.zipfian.grow_to(newest + 1);
        newest - self.zipfian.next(rng).min(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn keys_match_ycsb_hashed_insert_order() {
        // YCSB's first record in hashed order (load phase, record 0).
        assert_eq!(key_name(0), "user6284781860667377211");
        assert_eq!(fnv_hash64(1), 8_517_097_267_634_966_620);
    }

    #[test]
    fn zipfian_matches_grays_method_as_ycsb_defines_it() {
        let items = 1000u64;
        let zipfian = Zipfian::new(items);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let samples = 1_000_000u64;
        let mut counts = vec![0u64; items as usize];
        for _ in 0..samples {
            counts[zipfian.next(&mut rng) as usize] += 1;
        }
        let share = |count: u64| count as f64 / samples as f64;
        // Ranks 0 and 1 are exact: 1/zeta(n) and 0.5^theta/zeta(n).
        let zetan = zeta(0, items, ZIPFIAN_CONSTANT, 0.0);
        for (rank, expected) in [(0, 1.0 / zetan), (1, 0.5f64.powf(ZIPFIAN_CONSTANT) / zetan)] {
            let seen = share(counts[rank]);
            assert!(
                (seen - expected).abs() / expected < 0.03,
                "rank {rank}: {seen} vs {expected}"
            );
        }
        // Beyond them, P(X < x) = u with n·(η·u − η + 1)^α = x (Gray et al.).
        for x in [10u64, 100, 500] {
            let expected = ((x as f64 / items as f64).powf(1.0 / zipfian.alpha) - 1.0
                + zipfian.eta)
                / zipfian.eta;
            let seen = share(counts[..x as usize].iter().sum());
            assert!(
                (seen - expected).abs() < 0.005,
                "P(X < {x}): {seen} vs {expected}"
            );
        }
    }

    #[test]
    fn scrambled_zipfian_hot_key_has_the_weight_of_the_top_zipfian_item() {
        let items = 10_000;
        let scrambled = ScrambledZipfian::new(items);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let samples = 500_000;
        let mut counts = vec![0u64; items as usize];
        for _ in 0..samples {
            let item = scrambled.next(&mut rng);
            assert!(item < items);
            counts[item as usize] += 1;
        }
        let hottest = fnv_hash64(0) % items;
        let share = counts[hottest as usize] as f64 / samples as f64;
        let expected = 1.0 / SCRAMBLED_ZETAN;
        assert!(
            (share - expected).abs() / expected < 0.1,
            "hot key share {share} vs {expected}"
        );
        let touched = counts.iter().filter(|count| **count > 0).count();
        assert!(
            touched > items as usize / 2,
            "the popular items are spread over the key space ({touched})"
        );
    }

    #[test]
    fn latest_favours_the_newest_records() {
        let mut latest = Latest::new(1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let newest = 1999;
        let mut newest_hits = 0;
        for _ in 0..100_000 {
            let record = latest.next(newest, &mut rng);
            assert!(record <= newest);
            if record == newest {
                newest_hits += 1;
            }
        }
        let expected = 100_000.0 / zeta(0, newest + 1, ZIPFIAN_CONSTANT, 0.0);
        assert!(
            (newest_hits as f64 - expected).abs() / expected < 0.1,
            "{newest_hits} vs {expected:.0}"
        );
    }
}

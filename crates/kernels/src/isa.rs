//! Which inner loops this CPU runs, detected once per process.

/// Which inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

/// The best inner loops for this CPU (`FLOTILLA_RUNNER_ISA=portable|avx2|
/// avxvnni` caps it, for comparisons).
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let cap = std::env::var("FLOTILLA_RUNNER_ISA").unwrap_or_default();
        let supported = supported_isas();
        let best = supported.last().copied().unwrap_or(Isa::Portable);
        let capped = match cap.as_str() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avxvnni" => Isa::AvxVnni,
            _ => best,
        };
        if supported.contains(&capped) {
            capped
        } else {
            best
        }
    })
}

/// Every set of inner loops this CPU can run, best last.
pub(crate) fn supported_isas() -> &'static [Isa] {
    static ALL: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
    ALL.get_or_init(detect_isas)
}

fn detect_isas() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            isas.push(Isa::Avx2);
            if has!("avxvnni") {
                isas.push(Isa::AvxVnni);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                isas.push(Isa::Avx512Vnni);
            }
        }
    }
    isas
}

/// The inner loops this CPU can run, up to the chosen best (for tests).
pub fn available_isas() -> Vec<Isa> {
    let all = supported_isas();
    let best = best_isa();
    let end = all.iter().position(|i| *i == best).map_or(1, |p| p + 1);
    all[..end].to_vec()
}

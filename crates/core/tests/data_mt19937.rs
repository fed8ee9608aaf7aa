//! SPEC §3.5.4 / §17.1: CPython-compatible MT19937, splits and folds against pinned CPython values and
//! `fixtures/folds.json`.
use ultrarefiner::data::mt19937::{shuffled_range, Mt19937};
use ultrarefiner::data::splits::{kfold_indices, sort_names, test_split, SplitsFile};
use ultrarefiner::testing::fixture_path;

/// `r = random.Random(42); [r.getrandbits(32) for _ in range(10)]` (CPython 3).
const FIRST10: [u32; 10] = [
    2746317213, 478163327, 107420369, 3184935163, 1181241943, 1051802512, 958682846, 599310825,
    3163119785, 440213415,
];

#[test]
fn genrand_matches_cpython() {
    let mut r = Mt19937::from_seed(42);
    let got: Vec<u32> = (0..10).map(|_| r.next_u32()).collect();
    assert_eq!(got, FIRST10);
}

#[test]
fn shuffles_match_cpython() {
    // `r = random.Random(42); x = list(range(n)); r.shuffle(x)`.
    assert_eq!(shuffled_range(1, 42), vec![0]);
    assert_eq!(shuffled_range(2, 42), vec![1, 0]);
    assert_eq!(shuffled_range(5, 42), vec![3, 1, 2, 4, 0]);
    let want103 = vec![
        41, 78, 82, 9, 67, 47, 1, 72, 15, 80, 58, 10, 45, 33, 56, 37, 50, 32, 66, 44, 30, 65, 8,
        21, 55, 97, 89, 42, 63, 26, 79, 52, 95, 49, 61, 74, 48, 76, 101, 59, 87, 12, 36, 23, 39,
        40, 18, 68, 5, 62, 7, 34, 83, 46, 2, 51, 16, 38, 60, 70, 22, 6, 24, 85, 93, 102, 84, 19,
        73, 43, 88, 20, 0, 98, 57, 96, 53, 91, 25, 71, 92, 77, 64, 29, 27, 90, 100, 4, 54, 75, 11,
        69, 86, 13, 99, 17, 28, 31, 35, 94, 3, 14, 81,
    ];
    assert_eq!(shuffled_range(103, 42), want103);
    // n = 518 and 1500: first 12, last 6 and Σ i·x[i] (CPython).
    for (n, head, tail, wsum) in [
        (
            518usize,
            vec![226, 336, 421, 127, 312, 92, 474, 139, 386, 188, 303, 430],
            vec![142, 228, 250, 281, 25, 114],
            34643014u64,
        ),
        (
            1500,
            vec![
                1303, 397, 386, 549, 597, 1113, 1365, 134, 1117, 1164, 213, 1181,
            ],
            vec![457, 501, 563, 51, 228, 1309],
            843153938,
        ),
    ] {
        let x = shuffled_range(n, 42);
        assert_eq!(&x[..12], &head[..], "n = {n} head");
        assert_eq!(&x[n - 6..], &tail[..], "n = {n} tail");
        let s: u64 = x.iter().enumerate().map(|(i, &v)| (i * v) as u64).sum();
        assert_eq!(s, wsum, "n = {n} weighted sum");
    }
}

fn folds_json() -> serde_json::Value {
    let p = fixture_path("folds.json").unwrap();
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn as_usize(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn kfold_matches_fixture() {
    let j = folds_json();
    for (key, entry) in j["kfold"].as_object().unwrap() {
        let n: usize = key.parse().unwrap();
        assert_eq!(
            shuffled_range(n, 42),
            as_usize(&entry["permutation"]),
            "permutation n={n}"
        );
        let folds = kfold_indices(n, 5, 42);
        let want = entry["folds"].as_array().unwrap();
        assert_eq!(folds.len(), want.len());
        for (i, (f, w)) in folds.iter().zip(want).enumerate() {
            assert_eq!(f.val, as_usize(&w["val"]), "n={n} fold {i} val");
            assert_eq!(f.train, as_usize(&w["train"]), "n={n} fold {i} train");
        }
    }
}

#[test]
fn train_test_split_matches_fixture() {
    let j = folds_json();
    for (key, entry) in j["train_test_split"].as_object().unwrap() {
        let n = entry["n"].as_u64().unwrap() as usize;
        let items: Vec<usize> = (0..n).collect();
        let (train, test) = test_split(&items, 0.2, 42);
        assert_eq!(train, as_usize(&entry["train"]), "{key} train");
        assert_eq!(test, as_usize(&entry["test"]), "{key} test");
        assert_eq!(train.len(), entry["split_idx"].as_u64().unwrap() as usize);
    }
}

/// End to end through `SplitsFile::build` on names: the fixture indices are positions in the sorted `items` list
/// (test split) and in the sorted training list (folds), per fixtures/README.md and SPEC §3.5.1.
#[test]
fn splits_file_fold_membership_matches_fixture() {
    let j = folds_json();
    // 163 names whose .png-inclusive sort differs from the plain sort (`a-1` vs `a`).
    let mut names: Vec<String> = (0..163)
        .map(|i| {
            if i % 7 == 0 {
                format!("s{:03}-x", i / 2)
            } else {
                format!("s{i:03}")
            }
        })
        .collect();
    names.dedup();
    names.truncate(163);
    assert_eq!(names.len(), 163);
    let sp = SplitsFile::build("BUS_UCLM", &names, false, 0.2, 5, 42);
    let mut items = names.clone();
    sort_names(&mut items);
    let tt = &j["train_test_split"]["BUS_UCLM_total_163"];
    let mut want_train: Vec<String> = as_usize(&tt["train"])
        .iter()
        .map(|&i| items[i].clone())
        .collect();
    let mut want_test: Vec<String> = as_usize(&tt["test"])
        .iter()
        .map(|&i| items[i].clone())
        .collect();
    sort_names(&mut want_train);
    sort_names(&mut want_test);
    assert_eq!(sp.train, want_train);
    assert_eq!(sp.test, want_test);
    let kf = &j["kfold"]["130"]["folds"];
    for (i, f) in sp.folds.iter().enumerate() {
        let want_val: Vec<String> = as_usize(&kf[i]["val"])
            .iter()
            .map(|&k| sp.train[k].clone())
            .collect();
        let want_tr: Vec<String> = as_usize(&kf[i]["train"])
            .iter()
            .map(|&k| sp.train[k].clone())
            .collect();
        assert_eq!(f.val, want_val, "fold {i} val");
        assert_eq!(f.train, want_tr, "fold {i} train");
    }
}

#[test]
fn png_sort_includes_extension() {
    let mut v = vec!["a".to_string(), "a-1".to_string()];
    sort_names(&mut v);
    assert_eq!(v, vec!["a-1", "a"]);
}

/// "Did you mean" for names a user typed: symbols, registers.

/// Up to `limit` names from `candidates` within `maxDistance` edits of `name`, closest
/// first, then alphabetical.
public func closestNames(to name: String, among candidates: some Sequence<String>, maxDistance: Int, limit: Int = 3) -> [String] {
    candidates.map { ($0, editDistance($0, name)) }
        .filter { $0.1 <= maxDistance }
        .sorted { ($0.1, $0.0) < ($1.1, $1.0) }
        .prefix(limit)
        .map(\.0)
}

/// Levenshtein distance over UTF-8 bytes.
public func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.utf8), b = Array(b.utf8)
    if a.isEmpty || b.isEmpty { return max(a.count, b.count) }
    var prev = Array(0...b.count), cur = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        cur[0] = i
        for j in 1...b.count {
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        swap(&prev, &cur)
    }
    return prev[b.count]
}

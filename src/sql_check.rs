//! Static checks of the SQL a configuration carries, at load time: how many
//! statements a text holds and whether any is transaction control. coord
//! runs handlers, verify assertions and table DDL inside its own
//! transactions (a handler's writes commit with the checkpoint), so a
//! `COMMIT` in them would break exactly-once. Uses sqlparser's PostgreSQL
//! dialect (see `docs/decisions/0027-sql-checks-with-sqlparser.md`). Rust
//! projectors are checked the same way when they are registered
//! ([`check_definition`]). Never touches the database and never rewrites
//! the SQL.

use sqlparser::ast::{Set, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Word};

use crate::projector::{Projector, ProjectorExt};
use crate::{Error, Result};

/// How many statements a piece of SQL may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Exactly one statement (a handler, a verify assertion).
    One,
    /// One or more statements (a projector's `tables` DDL).
    Several,
}

/// Checks `sql`: at least one statement, exactly one when `expect` is
/// [`Expect::One`], and no transaction control (`BEGIN`, `START
/// TRANSACTION`, `COMMIT`, `END`, `ROLLBACK`, `ABORT`, `SAVEPOINT`,
/// `RELEASE`, `PREPARE TRANSACTION`, `COMMIT/ROLLBACK PREPARED`, `SET
/// TRANSACTION`, `SET SESSION CHARACTERISTICS`).
///
/// sqlparser's parser decides when it understands the text; PostgreSQL
/// syntax it does not cover falls back to its tokenizer (which knows
/// strings, dollar quotes, quoted identifiers and comments), splitting at
/// top-level semicolons and classifying each statement by its leading
/// keywords, as PostgreSQL's grammar does for these statements.
///
/// # Errors
/// A message naming the problem (the statement's number and its leading
/// words), without the field: the caller adds it.
pub(crate) fn check(sql: &str, expect: Expect) -> std::result::Result<(), String> {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(parsed) => parsed.iter().map(transaction_control).collect(),
        Err(_) => by_tokens(sql)?,
    };
    match statements.len() {
        0 => return Err("holds no SQL statement".into()),
        1 => {}
        n if expect == Expect::One => {
            return Err(format!(
                "holds {n} statements where exactly one is expected; \
                 give a single statement (without `;` between statements)"
            ))
        }
        _ => {}
    }
    for (i, control) in statements.iter().enumerate() {
        if let Some(control) = control {
            let which = if statements.len() == 1 {
                String::new()
            } else {
                format!("statement {} ", i + 1)
            };
            return Err(format!(
                "{which}is transaction control ({control}), which is not allowed: coord runs this \
                 SQL inside its own transaction and commits it together with the checkpoint"
            ));
        }
    }
    Ok(())
}

/// Checks that `sql` (one statement, already through [`check`]) is a query:
/// a `SELECT`, `VALUES`, `TABLE` or `WITH ... SELECT`, which a set-based
/// check must be (docs/decisions/0089-set-based-checks-name-failing-events.md).
/// Text sqlparser does not understand is judged by its first word.
///
/// # Errors
/// A message naming the statement's first word, without the field.
pub(crate) fn check_query(sql: &str) -> std::result::Result<(), String> {
    if let Ok(parsed) = Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        return match parsed.as_slice() {
            [Statement::Query(_)] => Ok(()),
            _ => Err(format!(
                "is not a query ({})",
                first_word(sql).unwrap_or_default()
            )),
        };
    }
    match first_word(sql).as_deref() {
        Some("SELECT" | "WITH" | "VALUES" | "TABLE" | "(") => Ok(()),
        other => Err(format!("is not a query ({})", other.unwrap_or_default())),
    }
}

/// Whether a set-based check (a query already through [`check_query`])
/// judges each event on its own: one `SELECT` whose first column is the
/// event's `position`, over `batch_events` alone (no other relation, join,
/// subquery, grouping, `DISTINCT`, window, `LIMIT` or `WITH`), so that the
/// events it passes in a batch it also passes in any part of that batch,
/// whatever the tables hold. A batch whose failing events such checks named
/// is applied without checking the rest again (the replay's park path;
/// docs/decisions/0091-checks-that-judge-each-event-alone.md). Text
/// sqlparser does not understand is judged not to.
pub(crate) fn judges_each_event_alone(sql: &str) -> bool {
    use sqlparser::ast::{Expr, GroupByExpr, SelectItem, SetExpr, TableFactor};
    let Ok(parsed) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return false;
    };
    let [Statement::Query(query)] = parsed.as_slice() else {
        return false;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let plain_query = query.with.is_none()
        && query.limit_clause.is_none()
        && query.fetch.is_none()
        && query.locks.is_empty()
        && query.pipe_operators.is_empty();
    let plain_select = select.distinct.is_none()
        && select.top.is_none()
        && select.into.is_none()
        && select.lateral_views.is_empty()
        && select.connect_by.is_empty()
        && select.having.is_none()
        && select.qualify.is_none()
        && select.named_window.is_empty()
        && matches!(&select.group_by, GroupByExpr::Expressions(by, modifiers) if by.is_empty() && modifiers.is_empty());
    let over_batch_events = match select.from.as_slice() {
        [from] if from.joins.is_empty() => matches!(
            &from.relation,
            TableFactor::Table { name, args: None, .. }
                if name.0.len() == 1 && name.to_string().eq_ignore_ascii_case("batch_events")
        ),
        _ => false,
    };
    // Without GROUP BY, a bare `position` first rules out aggregates.
    let position_first = match select.projection.first() {
        Some(SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }) => match e {
            Expr::Identifier(i) => i.value.eq_ignore_ascii_case("position"),
            Expr::CompoundIdentifier(parts) => parts
                .last()
                .is_some_and(|i| i.value.eq_ignore_ascii_case("position")),
            _ => false,
        },
        _ => false,
    };
    // One `SELECT` and no `TABLE`: no subquery, so no other relation and
    // no second reading of the batch; no window.
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return false;
    };
    let count = |keyword: &str| {
        tokens
            .iter()
            .filter(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword)))
            .count()
    };
    let alone = count("SELECT") == 1 && count("TABLE") == 0 && count("OVER") == 0;
    plain_query && plain_select && over_batch_events && position_first && alone
}

/// `sql` without the `;` that ends it, if any (and what follows it: space
/// and comments), so that a query can be put inside parentheses.
pub(crate) fn without_trailing_semicolon(sql: &str) -> &str {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() else {
        return sql;
    };
    let last = tokens
        .iter()
        .rev()
        .find(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF));
    match last {
        Some(t) if t.token == Token::SemiColon => {
            let start = t.span.start;
            // Lines and columns count from 1, columns in characters.
            let line_start: usize = sql
                .split_inclusive('\n')
                .take(start.line.saturating_sub(1) as usize)
                .map(str::len)
                .sum();
            let column: usize = sql[line_start..]
                .chars()
                .take(start.column.saturating_sub(1) as usize)
                .map(char::len_utf8)
                .sum();
            &sql[..line_start + column]
        }
        _ => sql,
    }
}

/// The first token of `sql` that is not space or a comment: an unquoted
/// word in upper case, or the token's text.
fn first_word(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    tokens.into_iter().find_map(|token| match token {
        Token::Whitespace(_) | Token::EOF => None,
        Token::Word(Word {
            value,
            quote_style: None,
            ..
        }) => Some(value.to_ascii_uppercase()),
        other => Some(other.to_string()),
    })
}

/// Checks a projector's definition before it is registered, whatever its
/// origin (a Rust projector has no configuration load): its `tables` DDL,
/// its `verify` assertions ([`check`]) and its event types
/// ([`crate::names::check_event_type`]).
///
/// # Errors
/// [`Error::InvalidInput`] (exit code 2) naming the projector and the problem.
pub(crate) fn check_definition(projector: &dyn Projector) -> Result<()> {
    let invalid = |what: String| {
        Error::InvalidInput(format!(
            "projector {}: {what}; fix its definition",
            projector.label()
        ))
    };
    check(projector.tables(), Expect::Several)
        .map_err(|e| invalid(format!("the tables DDL {e}")))?;
    for (i, sql) in projector.verify().iter().enumerate() {
        check(sql, Expect::One).map_err(|e| invalid(format!("verify assertion {} {e}", i + 1)))?;
    }
    for event_type in projector.event_types() {
        crate::names::check_event_type(&event_type).map_err(invalid)?;
    }
    Ok(())
}

/// The statement's kind when it is transaction control, from the AST.
fn transaction_control(statement: &Statement) -> Option<String> {
    let kind = match statement {
        Statement::StartTransaction { begin: true, .. } => "BEGIN",
        Statement::StartTransaction { .. } => "START TRANSACTION",
        Statement::Commit { end: true, .. } => "END",
        Statement::Commit { .. } => "COMMIT",
        Statement::Rollback { .. } => "ROLLBACK",
        Statement::Savepoint { .. } => "SAVEPOINT",
        Statement::ReleaseSavepoint { .. } => "RELEASE SAVEPOINT",
        Statement::Set(Set::SetTransaction { .. }) => "SET TRANSACTION",
        _ => return None,
    };
    Some(kind.to_owned())
}

/// Splits `sql` into statements with sqlparser's tokenizer and classifies
/// each by its leading words. Semicolons inside a `BEGIN ATOMIC ... END`
/// function body do not end a statement.
fn by_tokens(sql: &str) -> std::result::Result<Vec<Option<String>>, String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|e| format!("cannot be read as SQL: {e}"))?;
    let mut statements = Vec::new();
    // The statement's first words: unquoted words in upper case, "" for
    // any other token.
    let mut words: Vec<String> = Vec::new();
    let mut depth = 0usize;
    let mut previous = String::new();
    for token in tokens {
        let word = match &token {
            Token::Whitespace(_) | Token::EOF => continue,
            Token::SemiColon if depth == 0 => {
                if !words.is_empty() {
                    statements.push(leading_control(&words));
                }
                words.clear();
                previous.clear();
                continue;
            }
            Token::Word(Word {
                value,
                quote_style: None,
                ..
            }) => value.to_ascii_uppercase(),
            _ => String::new(),
        };
        match word.as_str() {
            "ATOMIC" if previous == "BEGIN" => depth += 1,
            "CASE" if depth > 0 => depth += 1,
            "END" if depth > 0 => depth -= 1,
            _ => {}
        }
        if words.len() < 3 {
            words.push(word.clone());
        }
        previous = word;
    }
    if !words.is_empty() {
        statements.push(leading_control(&words));
    }
    Ok(statements)
}

/// Transaction control recognised by a statement's first words.
fn leading_control(words: &[String]) -> Option<String> {
    let first: Vec<&str> = words.iter().map(String::as_str).collect();
    let kind = match first.as_slice() {
        ["BEGIN", "ATOMIC", ..] => return None,
        ["BEGIN", ..] => "BEGIN",
        ["START", ..] => "START TRANSACTION",
        ["COMMIT", "PREPARED", ..] => "COMMIT PREPARED",
        ["ROLLBACK", "PREPARED", ..] => "ROLLBACK PREPARED",
        ["COMMIT", ..] => "COMMIT",
        ["END", ..] => "END",
        ["ROLLBACK", ..] => "ROLLBACK",
        ["ABORT", ..] => "ABORT",
        ["SAVEPOINT", ..] => "SAVEPOINT",
        ["RELEASE", ..] => "RELEASE SAVEPOINT",
        ["PREPARE", "TRANSACTION", ..] => "PREPARE TRANSACTION",
        ["SET", "TRANSACTION", ..] => "SET TRANSACTION",
        ["SET", "SESSION", "CHARACTERISTICS"] => "SET SESSION CHARACTERISTICS",
        _ => return None,
    };
    Some(kind.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table named `end` and a function whose `BEGIN ATOMIC` body holds
    /// `END` and `;`: two statements, neither transaction control.
    macro_rules! atomic_body {
        () => {
            "CREATE TABLE \"end\" (x int); CREATE FUNCTION f() RETURNS int LANGUAGE sql \
             BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END;"
        };
    }

    fn refused(sql: &str, expect: Expect) -> String {
        check(sql, expect).expect_err(sql)
    }

    #[test]
    fn a_trailing_semicolon_is_cut_with_what_follows_it() {
        assert_eq!(without_trailing_semicolon("SELECT 1"), "SELECT 1");
        assert_eq!(without_trailing_semicolon("SELECT 1 ;  "), "SELECT 1 ");
        assert_eq!(
            without_trailing_semicolon("SELECT 'é;'\n  , 2; -- done\n"),
            "SELECT 'é;'\n  , 2"
        );
        assert_eq!(
            without_trailing_semicolon("SELECT $q$;$q$ -- ;"),
            "SELECT $q$;$q$ -- ;"
        );
    }

    #[test]
    fn checks_must_be_queries() {
        for sql in [
            "SELECT position, 'bad' FROM batch_events WHERE data->>'amount' IS NULL",
            "WITH b AS (SELECT * FROM batch_events) SELECT position, 'x' FROM b",
            "VALUES (1, 'x')",
            "-- names the failing events\n(SELECT position, 'x' FROM batch_events)",
        ] {
            assert_eq!(check_query(sql), Ok(()), "{sql}");
        }
        for (sql, word) in [
            ("DELETE FROM balances", "DELETE"),
            ("/* a */ insert into t select 1", "INSERT"),
            ("UPDATE t SET a = 1 RETURNING a", "UPDATE"),
            // sqlparser cannot read it; the first word decides.
            ("CALL do_it() WITH NO DATA LIKE", "CALL"),
        ] {
            let e = check_query(sql).expect_err(sql);
            assert_eq!(e, format!("is not a query ({word})"), "{sql}");
        }
    }

    #[test]
    fn ordinary_handlers_and_assertions_pass() {
        for sql in [
            "INSERT INTO balances (account) VALUES ($1)",
            "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1;",
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET n = t.n + 1",
            "SELECT count(*) > 0 FROM balances",
            "SELECT 'COMMIT; BEGIN' = $4",
            "SELECT $q$ ; COMMIT $q$ = $4 -- ; COMMIT",
            "/* ; rollback */ DELETE FROM \"commit\" WHERE id = $1",
        ] {
            assert_eq!(check(sql, Expect::One), Ok(()), "{sql}");
        }
    }

    #[test]
    fn table_ddl_may_hold_several_statements() {
        for sql in [
            "CREATE TABLE a (x int PRIMARY KEY); CREATE TABLE b (y text);",
            "CREATE TABLE a (data jsonb); CREATE INDEX ON a USING gin (data jsonb_path_ops);",
            atomic_body!(),
            "CREATE FUNCTION g() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$;",
        ] {
            assert_eq!(check(sql, Expect::Several), Ok(()), "{sql}");
        }
    }

    #[test]
    fn transaction_control_is_refused_wherever_it_stands() {
        for (sql, kind) in [
            ("COMMIT", "COMMIT"),
            ("commit;", "COMMIT"),
            ("/* x */ CoMmIt", "COMMIT"),
            ("END", "END"),
            ("BEGIN", "BEGIN"),
            ("START TRANSACTION", "START TRANSACTION"),
            ("ROLLBACK", "ROLLBACK"),
            ("ABORT", "ROLLBACK"),
            ("SAVEPOINT s", "SAVEPOINT"),
            ("RELEASE SAVEPOINT s", "RELEASE SAVEPOINT"),
            ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
            ("COMMIT PREPARED 'x'", "COMMIT PREPARED"),
            ("ROLLBACK PREPARED 'x'", "ROLLBACK PREPARED"),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                "SET",
            ),
            (
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                "SET TRANSACTION",
            ),
        ] {
            for expect in [Expect::One, Expect::Several] {
                let err = refused(sql, expect);
                assert!(
                    err.contains(&format!("transaction control ({kind}")),
                    "{sql}: {err}"
                );
            }
        }
        let err = refused(
            "CREATE TABLE a (x int); COMMIT; CREATE TABLE b (y int)",
            Expect::Several,
        );
        assert!(
            err.starts_with("statement 2 is transaction control (COMMIT)"),
            "{err}"
        );
        let err = refused(
            "CREATE TABLE a (d jsonb); CREATE INDEX ON a USING gin (d jsonb_path_ops); END;",
            Expect::Several,
        );
        assert!(
            err.starts_with("statement 3 is transaction control (END)"),
            "{err}"
        );
    }

    #[test]
    fn several_statements_are_refused_where_one_is_expected() {
        let err = refused("INSERT INTO t VALUES ($1); DELETE FROM t", Expect::One);
        assert!(err.starts_with("holds 2 statements"), "{err}");
        let err = refused("SELECT 1; COMMIT", Expect::One);
        assert!(err.starts_with("holds 2 statements"), "{err}");
    }

    #[test]
    fn empty_and_unreadable_sql_is_refused() {
        assert_eq!(
            refused(" ; -- nothing", Expect::Several),
            "holds no SQL statement"
        );
        let err = refused("SELECT 'unterminated", Expect::One);
        assert!(err.starts_with("cannot be read as SQL"), "{err}");
    }

    #[test]
    fn the_tokenizer_fallback_agrees_with_the_parser() {
        for sql in [
            "INSERT INTO t VALUES ($1)",
            "CREATE TABLE a (x int); COMMIT; CREATE TABLE b (y int);",
            concat!(atomic_body!(), " END"),
            "BEGIN; SELECT 'a;b'; SAVEPOINT s; RELEASE SAVEPOINT s; ROLLBACK; START TRANSACTION",
            " ; -- nothing",
        ] {
            let parsed: Vec<Option<String>> = Parser::parse_sql(&PostgreSqlDialect {}, sql)
                .expect(sql)
                .iter()
                .map(transaction_control)
                .collect();
            assert_eq!(by_tokens(sql).unwrap(), parsed, "{sql}");
        }
    }

    #[test]
    fn checks_that_judge_each_event_alone() {
        for alone in [
            "SELECT position, 'no amount' FROM batch_events WHERE data->>'amount' IS NULL",
            "select e.position, format('bad %s', e.data) as message from batch_events e \
             where jsonb_typeof(e.data->'amount') is distinct from 'number';",
            "SELECT position AS p, 'x' FROM batch_events",
            "SELECT position, 'old' FROM batch_events WHERE extract(year FROM recorded_at) < 2000",
        ] {
            assert!(judges_each_event_alone(alone), "{alone}");
        }
        for not in [
            // Another relation, the batch read twice, a join.
            "SELECT position, 'parked stream' FROM batch_events e WHERE EXISTS \
             (SELECT 1 FROM coord.parked_events p WHERE p.stream_id = e.stream_id)",
            "SELECT e.position, 'x' FROM batch_events e JOIN balances b ON b.account = e.stream_id",
            "SELECT e.position, 'x' FROM batch_events e, balances b WHERE b.account = e.stream_id",
            "SELECT position, 'x' FROM batch_events WHERE stream_id IN (TABLE blocked)",
            // The set matters: grouping, windows, DISTINCT, LIMIT, WITH, set operations.
            "SELECT max(position), 'x' FROM batch_events GROUP BY stream_id",
            "SELECT position, 'x' FROM batch_events GROUP BY position HAVING count(*) > 1",
            "SELECT position, 'x' FROM (SELECT position, sum((data->>'amount')::int) OVER (PARTITION BY stream_id ORDER BY position) s FROM batch_events) t WHERE s < 0",
            "SELECT position, sum(1) OVER () FROM batch_events",
            "SELECT DISTINCT position, 'x' FROM batch_events",
            "SELECT position, 'x' FROM batch_events LIMIT 1",
            "WITH b AS (SELECT * FROM batch_events) SELECT position, 'x' FROM b",
            "SELECT position, 'x' FROM batch_events UNION SELECT position, 'y' FROM batch_events",
            // Not the position first, another relation, not sqlparser's.
            "SELECT 1, 'x' FROM batch_events",
            "SELECT position, 'x' FROM other_events",
            "SELECT position, 'x' FROM s.batch_events",
            "VALUES (1, 'x')",
            "SELECT position, 'x' FROM batch_events WHERE WITH NO DATA LIKE",
        ] {
            assert!(!judges_each_event_alone(not), "{not}");
        }
    }
}
